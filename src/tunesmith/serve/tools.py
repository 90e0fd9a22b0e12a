"""Tool calling in chat completions: `tools`, `tool_choice` and `parallel_tool_calls` in, the
assistant's `tool_calls` out (whole, or as streamed deltas in OpenAI's shape).

The call syntax is the model's chat template's own, or the documented default
(data/tool_format.py, data/tool_syntax.py). With tool_choice `required` or a named function the whole answer is
held to a grammar of calls whose arguments are each function's `parameters` schema; with
`auto` (the default) the answer is either free text without a call, or calls from its first
token on, so a call, once opened, is always held to the grammar (for Llama 3.x's bare JSON:
an answer whose first character is `{` is a call, any other first character begins text;
the special token `<|python_tag|>` may come first, before a call or a built-in tool's text).
`none` renders the tools and generates free text.

    client.chat.completions.create(model=..., messages=..., tools=[{"type": "function", "function": {...}}])
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tunesmith.data.tool_syntax import ToolSyntax, opens_call, parse_calls
from tunesmith.generate.constraints import Constraint, ConstraintError, check_schema_limits
from tunesmith.serve import protocol as p
from tunesmith.serve.errors import APIError

ANY_ARGUMENTS = {"type": "object"}
"""A function declared without `parameters` takes any object."""
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""A call's JSON is written as json.dumps (and Jinja's tojson) write it, which is how
data/tool_format.py renders calls for training: the text served is the text trained."""


@dataclass
class ToolPlan:
    """What a request with tools asks: the syntax to parse, the constraint (None: free)."""

    syntax: ToolSyntax
    constraint: Constraint | None


def wire_messages(req: p.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the engine renders them (tool calls and results included)."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                               "name": m.name}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        out.append(msg)
    return out


def tool_definitions(req: p.ChatCompletionRequest) -> list[dict[str, Any]] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def plan(req: p.ChatCompletionRequest, other_constraint: bool, syntax: ToolSyntax) -> ToolPlan | None:
    """The tool plan of a request in the model's `syntax`, None without tools or with
    tool_choice none; a 400 for a tool_choice that names no declared function, or parameters
    over OpenAI's limits. A syntax without parallel calls (Llama 3.x's) makes one call:
    `parallel_tool_calls` allows several, it never asks for them."""
    if req.tool_choice is not None and not req.tools:
        raise APIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if not req.tools or req.tool_choice == "none":
        return None
    if other_constraint:
        raise APIError(400, "give 'tools' or a response constraint (response_format, guided_regex, guided_choice), "
                            "not both; or set tool_choice to 'none'", param="tools")
    functions = {}
    for i, tool in enumerate(req.tools):
        params = tool.function.parameters or ANY_ARGUMENTS
        try:
            check_schema_limits(params)
        except ConstraintError as exc:
            raise APIError(400, f"tools[{i}].function.parameters: {exc}", param=f"tools[{i}].function.parameters",
                           code=exc.code) from None
        functions[tool.function.name] = params
    choice = req.tool_choice or "auto"
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in functions:
            raise APIError(400, f"tool_choice names function '{choice.function.name}', which is not in 'tools' "
                                f"({', '.join(functions)})", param="tool_choice")
        functions = {choice.function.name: functions[choice.function.name]}
    parallel = req.parallel_tool_calls and syntax.parallel and not isinstance(choice, p.NamedToolChoice)
    grammar = call_grammar(syntax, functions, parallel=parallel, free_text=choice == "auto")
    return ToolPlan(syntax, Constraint.lark(grammar))


def call_grammar(syntax: ToolSyntax, functions: dict[str, dict[str, Any]], parallel: bool, free_text: bool) -> str:
    """llguidance's Lark grammar for an answer of calls (one, or several with `parallel`), or
    with `free_text` also of plain text that opens no call."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, syntax.arguments_key: params},
              "required": ["name", syntax.arguments_key], "additionalProperties": False}
             for name, params in functions.items()]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    schema = {**schema, "x-guidance": CALL_JSON}
    call = [json.dumps(syntax.open)] * bool(syntax.open) + [f"%json {json.dumps(schema)}"] + \
        [json.dumps(syntax.close)] * bool(syntax.close)
    # Llama 3.x may open its calls with the special token <|python_tag|>; the call after it
    # is held to the same grammar (a grammar names a special token as `<|python_tag|>`).
    lead = f"{syntax.call_token}? " if syntax.call_token else ""
    lines = [f"call: {' '.join(call)}",
             f"calls: {lead}call ({json.dumps(syntax.separator)} call)*" if parallel else f"calls: {lead}call"]
    if free_text and syntax.open:
        # Text that never opens a call. (Text and then a call is not allowed: llguidance's
        # lexer cannot end the text where the call's opening tag begins.)
        text = f"/(?s:.+)/ & ~/(?s:.*{_regex_literal(syntax.open.strip())}.*)/"
        lines = ["start: TEXT | calls", *lines, f"TEXT: {text}"]
    elif free_text:
        # A bare-JSON call is the answer's first object: text is anything that begins with
        # neither `{` nor whitespace (which the template trims from every answer it renders).
        # After the call token, text that is not a call is a built-in tool's call (Llama's
        # `brave_search.call(...)`, python code): it has no OpenAI form and comes back as content.
        builtin = f" | {syntax.call_token} TEXT" if syntax.call_token else ""
        lines = [f"start: TEXT | calls{builtin}", *lines, "TEXT: /[^{\\s](?s:.*)/"]
    else:
        lines = ["start: calls", *lines]
    return "\n".join(lines) + "\n"


def _regex_literal(text: str) -> str:
    """`text` as a Rust regex (which reads an escaped `<` as a word boundary: only escape metacharacters)."""
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$#&-~/" else ch for ch in text)


def _call(name: str, arguments: Any) -> p.ToolCall:
    return p.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                      function=p.FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))


def message(syntax: ToolSyntax, text: str, finish_reason: str) -> tuple[p.AssistantMessage, str]:
    """The assistant message of a finished answer, and its finish_reason (tool_calls when it called)."""
    content, calls = parse_calls(syntax, text)
    if not calls:
        return p.AssistantMessage(content=text), finish_reason
    return (p.AssistantMessage(content=content or None, tool_calls=[_call(n, a) for n, a in calls]),
            "tool_calls" if finish_reason == "stop" else finish_reason)


@dataclass
class CallStream:
    """One streamed choice: text goes out as content until a call opens; each call goes out,
    once closed, as OpenAI's deltas (id, type and name, then the arguments)."""

    syntax: ToolSyntax
    text: str = ""
    sent: int = 0
    """Characters of `text` sent as content."""
    calls_sent: int = 0
    in_calls: bool = False

    def feed(self, piece: str, finished: bool) -> list[p.Delta]:
        self.text += piece
        out: list[p.Delta] = []
        if not self.in_calls:
            at = opens_call(self.syntax, self.text)
            if at is not None and at >= self.sent:
                self.in_calls = True
                # Only whitespace before the call is no content (parse_calls strips it too).
                end = at if self.text[:at].strip() else self.sent
            elif finished:
                end = len(self.text)
            else:  # hold back what may begin the opener
                end = _safe_end(self.text, self.syntax)
            if end > self.sent:
                out.append(p.Delta(content=self.text[self.sent:end]))
            self.sent = max(self.sent, end)
        if self.in_calls:
            _, calls = parse_calls(self.syntax, self.text)
            for name, arguments in calls[self.calls_sent:]:
                call = _call(name, arguments)
                index = self.calls_sent
                out.append(p.Delta(tool_calls=[p.ToolCallDelta(index=index, id=call.id, type="function",
                                                               function=p.FunctionCallDelta(name=name, arguments=""))]))
                out.append(p.Delta(tool_calls=[p.ToolCallDelta(
                    index=index, function=p.FunctionCallDelta(arguments=call.function.arguments))]))
                self.calls_sent += 1
            if finished and not self.calls_sent and len(self.text) > self.sent:
                # No call parsed after all (cut off by max_tokens): the text goes out as
                # content, as the whole answer's message has it.
                out.append(p.Delta(content=self.text[self.sent:]))
                self.sent = len(self.text)
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls_sent and reason == "stop" else reason


def _safe_end(text: str, syntax: ToolSyntax) -> int:
    """Where content can be sent up to: before any tail of `text` that may begin a call (for
    a bare-JSON syntax, the whitespace that may come before its `{`)."""
    if not syntax.open:
        return len(text) if text.strip() else 0
    opener = syntax.open.strip()
    for n in range(min(len(opener) - 1, len(text)), 0, -1):
        if text.endswith(opener[:n]):
            return len(text) - n
    return len(text)
