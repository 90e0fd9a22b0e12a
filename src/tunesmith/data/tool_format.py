"""How tools and tool calls are written into a conversation's text, for training and serving
alike (data/render.py applies it, so the text trained is the text served).

A chat template that renders tools itself gets them as they are, with each call's
`arguments` as an object, as those templates expect; its syntax (data/tool_syntax.py) is
what serve constrains and parses:
- Hermes' when it mentions `tools`, `tool_calls` and `<tool_call>` (Qwen2.5, Hermes, SmolLM3);
- Llama 3.x's JSON when it mentions `tools`, `tool_calls`, `ipython` and writes a call's
  `"parameters": ` itself (Meta's Llama 3.1/3.2/3.3 templates, vLLM's llama3.1_json one):
  tools in the first user turn (or the system turn), a call as the bare object
  `{"name": ..., "parameters": {...}}`, a `tool` message as an `ipython` turn.
Any other template (SmolLM2's plain ChatML) gets the one documented default, Hermes'
syntax (Qwen2.5's own):
- the tools are listed in the system message, after its text, with how to call them;
- an assistant call is written in its content as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call,
  one line apart;
- a `tool` message becomes a user turn `<tool_response>\\n...\\n</tool_response>`.

    python -c "from tunesmith.data.tool_format import DEFAULT_SYSTEM; print(DEFAULT_SYSTEM)"
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Sequence

from tunesmith.data.example import Message
from tunesmith.data.tool_syntax import HERMES, LLAMA3_JSON, ToolSyntax, arguments_object, calls_text, function_of


DEFAULT_SYSTEM = (
    "You may call these functions, each with one "
    '<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>:\n'
)


def template_syntax(tokenizer: Any) -> ToolSyntax | None:
    """The syntax in which the chat template writes tools and calls itself; None when it
    does not (the default is then rendered around it, see tool_syntax)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or not all(word in template for word in ("tools", "tool_calls")):
        return None
    if "<tool_call>" in template:
        return HERMES
    if "ipython" in template and '"parameters": ' in template:
        return LLAMA3_JSON
    return None


def tool_syntax(tokenizer: Any) -> ToolSyntax:
    """The syntax a model is trained and served with: its template's own, else the default;
    without the syntax's call token where the tokenizer has no such special token (a grammar
    that names a token the tokenizer lacks does not compile)."""
    syntax = template_syntax(tokenizer) or HERMES
    if syntax.call_token and not _has_special_token(tokenizer, syntax.call_token):
        syntax = replace(syntax, call_token="")
    return syntax


def _has_special_token(tokenizer: Any, token: str) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return token in getattr(tokenizer, "all_special_tokens", ()) or any(
        getattr(t, "special", False) and str(t) == token for t in added)


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes tools and calls itself."""
    return template_syntax(tokenizer) is not None


FUNCTION_KEYS = ("name", "description", "parameters", "strict")
"""A function definition's fields in OpenAI's order, which serve's request model keeps."""


def canonical_tool(tool: Any) -> Any:
    """A tool as `{"type": "function", "function": {...}}` with the function's fields in
    OpenAI's order (unset ones left out, others after): templates write tools with tojson, so
    a training file's key order must not make its prompt differ from the one serve renders."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict):
        return tool
    ordered = {k: fn[k] for k in FUNCTION_KEYS if fn.get(k) is not None}
    return {"type": "function", "function": {**ordered, **{k: v for k, v in fn.items() if k not in FUNCTION_KEYS}}}


def for_template(tokenizer: Any, messages: Sequence[Message], tools: Any) -> tuple[list[Message], Any]:
    """The messages and tools to give the chat template (see the module's rules)."""
    if not tools and not any(m.tool_calls or m.role == "tool" for m in messages):
        return list(messages), tools
    tools = [canonical_tool(t) for t in tools] if isinstance(tools, list) else tools
    if template_renders_tools(tokenizer):
        out = []
        for m in messages:
            if m.tool_calls:
                calls = [{**c, "type": "function", "function": {**function_of(c), "arguments": arguments_object(
                    function_of(c).get("arguments"))}} for c in m.tool_calls]
                m = replace(m, tool_calls=calls)
            out.append(m)
        return out, tools
    return _default(messages, tools), None


def _default(messages: Sequence[Message], tools: Any) -> list[Message]:
    out: list[Message] = []
    listing = ""
    if tools:
        listing = DEFAULT_SYSTEM + "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    for m in messages:
        if m.tool_calls:
            m = replace(m, content=calls_text(m.content, m.tool_calls), tool_calls=None)
        elif m.role == "tool":
            m = Message("user", f"<tool_response>\n{m.content}\n</tool_response>")
        out.append(m)
    if listing:
        if out and out[0].role == "system":
            out[0] = replace(out[0], content=(out[0].content + "\n\n" if out[0].content else "") + listing)
        else:
            out.insert(0, Message("system", listing))
    return out
