"""The tool-call syntaxes: how a call is written as text and read back, for rendering,
serving and scoring alike.

- Hermes' (Qwen2.5, Hermes, SmolLM3, and tunesmith's default for templates without tools):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
- Llama 3.x's JSON (Meta's 3.1/3.2/3.3 templates, vLLM's `llama3_json`): the answer is one
  bare object `{"name": ..., "parameters": {...}}` (`parameters`, not `arguments`) and
  nothing else; an answer is a call when its first character other than whitespace is `{`.
  The templates write one call per message (they refuse several), so no parallel calls.
  The model may write the special token `<|python_tag|>` before the call (Meta's template
  writes it before a built-in tool's call, and the models write it before JSON calls too):
  the engine's text leaves special tokens out, so the call is read the same either way.

    python -c "from tunesmith.data.tool_syntax import LLAMA3_JSON, call_text; print(call_text(LLAMA3_JSON, 'f', {'x': 1}))"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class ToolSyntax:
    """How a model writes a call: each call `open + {"name", arguments_key} + close`."""

    name: str
    open: str
    """Empty for a bare-JSON syntax: the call is the answer's first object."""
    close: str
    separator: str
    arguments_key: str
    parallel: bool = True
    """Whether one answer may hold several calls (`separator` between them)."""
    end_tokens: tuple[str, ...] = ()
    """Special tokens besides the template's end of turn that may end an answer which calls
    (Llama 3.x ends a call with <|eom_id|> when its system turn says `Environment: ipython`)."""
    call_token: str = ""
    """A special token the model may write just before its calls (Llama 3.x's <|python_tag|>);
    serve's grammar allows it there when the tokenizer has it (data/tool_format.tool_syntax)."""


HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments")
"""Qwen2.5's, Hermes', SmolLM3's, and the default for templates without tools."""

LLAMA3_JSON = ToolSyntax("llama3_json", "", "", "", "parameters", parallel=False, end_tokens=("<|eom_id|>",),
                         call_token="<|python_tag|>")
"""Llama 3.1/3.2/3.3's custom-tool syntax: one bare JSON object."""


def call_text(syntax: ToolSyntax, name: str, arguments: Any) -> str:
    return syntax.open + json.dumps({"name": name, syntax.arguments_key: arguments}, ensure_ascii=False) + syntax.close


def arguments_object(arguments: Any) -> Any:
    """A call's arguments as an object: OpenAI sends a JSON string, templates want the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def function_of(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", call)
    return fn if isinstance(fn, dict) else {}


def calls_text(content: str, tool_calls: Sequence[dict[str, Any]]) -> str:
    """An assistant message's text and calls, as the default syntax writes them."""
    calls = HERMES.separator.join(
        call_text(HERMES, function_of(c).get("name", ""), arguments_object(function_of(c).get("arguments")))
        for c in tool_calls)
    return (content + "\n" if content else "") + calls


def opens_call(syntax: ToolSyntax, text: str) -> int | None:
    """Where the first call of `text` opens, None if none does (yet). A bare-JSON answer
    opens one at its first character other than whitespace, if that is `{`, or never."""
    if syntax.open:
        at = text.find(syntax.open.strip())
        return at if at >= 0 else None
    body = text.lstrip()
    return len(text) - len(body) if body.startswith("{") else None


def parse_calls(syntax: ToolSyntax, text: str) -> tuple[str, list[tuple[str, Any]]]:
    """(content before the calls, [(name, arguments object)]) of an answer; no calls: (text, [])."""
    if not syntax.open:
        calls = _parse_bare(syntax, text)
        return ("", calls) if calls else (text, [])
    pattern = re.escape(syntax.open.strip()) + r"\s*(\{.*?\})\s*" + re.escape(syntax.close.strip())
    found = list(re.finditer(pattern, text, flags=re.S))
    if not found:
        return text, []
    content = text[:found[0].start()].strip()
    bodies = [f.group(1) for f in found]
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        calls.append((obj["name"], obj.get(syntax.arguments_key, {})))
    return content, calls


def _parse_bare(syntax: ToolSyntax, text: str) -> list[tuple[str, Any]]:
    """The calls of a bare-JSON answer: objects with a string `name` and an object of
    arguments (under the syntax's key, or `arguments`, which Llama models also write, as
    vLLM's llama3_json parser accepts), `;` apart, and nothing else but whitespace."""
    if opens_call(syntax, text) is None:
        return []
    decoder = json.JSONDecoder()
    calls: list[tuple[str, Any]] = []
    rest = text.strip()
    while True:
        try:
            obj, end = decoder.raw_decode(rest)
        except ValueError:
            return []
        key = syntax.arguments_key if isinstance(obj, dict) and syntax.arguments_key in obj else "arguments"
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get(key), dict)):
            return []
        calls.append((obj["name"], obj[key]))
        rest = rest[end:].strip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return []
        rest = rest[1:].strip()
