"""The tool-call syntax: how a call is written as text (Hermes', which Qwen2.5 and SmolLM3
use, and tunesmith's default) and read back, for rendering, serving and scoring alike.

    python -c "from tunesmith.data.tool_syntax import HERMES, call_text; print(call_text(HERMES, 'f', {'x': 1}))"
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
    close: str
    separator: str
    arguments_key: str


HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments")
"""Qwen2.5's, Hermes', SmolLM3's, and the default for templates without tools."""


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


def parse_calls(syntax: ToolSyntax, text: str) -> tuple[str, list[tuple[str, Any]]]:
    """(content before the calls, [(name, arguments object)]) of an answer; no calls: (text, [])."""
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
