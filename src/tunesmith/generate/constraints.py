"""What an answer can be held to, and the limits on it: a JSON Schema (json_object is the
schema of any object), a regular expression, a choice among fixed strings, or a grammar
(tool calls). llguidance compiles each into a token mask the engine applies per row, per
step (generate/engine.py); this module only builds and checks the grammar text.

OpenAI's documented limits on structured-output schemas are enforced before anything is
compiled, each refusal naming the limit, so no schema can make a compile take long.

    python -c "from tunesmith.generate.constraints import Constraint; print(Constraint.choice(['yes', 'no']).grammar())"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from tunesmith.errors import UsageError

ANY_OBJECT = {"type": "object"}
"""json_object's schema: any object."""

MAX_PROPERTIES = 5000
"""Object properties in one schema, all levels together (OpenAI's limit)."""
MAX_DEPTH = 10
"""Levels of nested objects and arrays (OpenAI's limit)."""
MAX_ENUM_VALUES = 1000
"""enum values in one schema, all enums together (OpenAI's limit)."""
MAX_TEXT_CHARS = 120_000
"""Characters of property names, $defs names, enum and const values together (OpenAI's limit)."""
LARGE_ENUM_VALUES = 250
MAX_LARGE_ENUM_CHARS = 15_000
"""Characters of one string enum with more than LARGE_ENUM_VALUES values (OpenAI's limit)."""
MAX_CHOICES = 1000
"""Strings in one choice (guided_choice); the same bound as the enum values of a schema."""
MAX_PATTERN_CHARS = 10_000
"""Characters of a regular expression (guided_regex)."""

MAX_WHITESPACE_RUN = 32
"""Longest run of whitespace between JSON tokens: room for indentation, not for a model
stuck emitting newlines."""
# Whitespace stays free (bounded): held to one-line JSON, SmolLM2-135M-Instruct, which
# indents its JSON, answered '{",": 30}' for Alice's name and age; free, the object it meant.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[\\x20\\x0A\\x0D\\x09]{0,%d}" % MAX_WHITESPACE_RUN}


class ConstraintError(UsageError):
    """A constraint that cannot be honoured; `code` and `param` say which limit or keyword."""

    def __init__(self, message: str, code: str = "unsupported_schema"):
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple:  # keeps `code` when it crosses a process boundary (generate/process.py)
        return (type(self), (str(self), self.code))


@dataclass(frozen=True)
class Constraint:
    """One constraint, as the text llguidance compiles (hashable: the engine caches compiles)."""

    kind: str
    """json_schema, regex, choice or grammar (llguidance's Lark)."""
    source: str
    """The schema or choice list as JSON, the regex, or the Lark grammar."""

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> "Constraint":
        """A value of `schema`, after OpenAI's limits (a ConstraintError names the one passed)."""
        check_schema_limits(schema)
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ConstraintError(f"the regular expression is {len(pattern)} characters; at most "
                                  f"{MAX_PATTERN_CHARS} are accepted", code="pattern_too_long")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "Constraint":
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise ConstraintError("a choice needs at least one string, and no empty ones", code="invalid_choice")
        if len(choices) > MAX_CHOICES:
            raise ConstraintError(f"{len(choices)} choices given; at most {MAX_CHOICES} are accepted",
                                  code="too_many_choices")
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def lark(cls, grammar: str) -> "Constraint":
        return cls("grammar", grammar)

    def grammar(self) -> str:
        """The grammar text llguidance's LLMatcher takes."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.source)))
        return LLMatcher.grammar_from_lark(self.source)

    def request_fields(self) -> dict[str, Any]:
        """The chat-completion arguments that ask an OpenAI-compatible server for the same
        constraint: response_format for a schema (OpenAI's), vLLM's extra_body for the rest."""
        if self.kind == "json_schema":
            return {"response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": True, "schema": json.loads(self.source)}}}
        if self.kind == "choice":
            return {"extra_body": {"guided_choice": json.loads(self.source)}}
        if self.kind == "regex":
            return {"extra_body": {"guided_regex": self.source}}
        raise ConstraintError("a grammar has no OpenAI request field")

    def record(self) -> dict[str, Any]:
        """What a run's metrics say the answers were held to."""
        if self.kind in ("json_schema", "choice"):
            return {self.kind: json.loads(self.source)}
        return {self.kind: self.source}


def check_grammar(constraint: Constraint) -> None:
    """Compile without a tokenizer, to refuse a bad schema or regex before any model loads."""
    from llguidance import LLMatcher

    try:
        grammar = constraint.grammar()
    except ValueError as exc:
        raise ConstraintError(f"the {constraint.kind} cannot be read: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"the {constraint.kind} cannot be honoured: {error.strip()}")


# ----------------------------------------------------------------------------- OpenAI's limits


def check_schema_limits(schema: dict[str, Any]) -> None:
    """Refuse a schema over OpenAI's documented limits, naming the limit (the first one passed)."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON Schema is an object, got {type(schema).__name__}")
    try:
        nodes = list(_subschemas(schema, 1))
    except RecursionError:  # serve refuses deep schemas first (serve/limits.py); a file may not
        raise ConstraintError(f"the schema is nested deeper than Python can walk; OpenAI's limit is {MAX_DEPTH} "
                              "levels of nesting", code="schema_too_large") from None
    properties = enum_values = text_chars = depth = 0
    for node, level in nodes:
        props = node.get("properties")
        if isinstance(props, dict):
            properties += len(props)
            text_chars += sum(len(k) for k in props)
        if node.get("type") in ("object", "array") or isinstance(props, dict) or "items" in node:
            depth = max(depth, level)
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), dict):
                text_chars += sum(len(k) for k in node[key])
        values = node.get("enum")
        if isinstance(values, list):
            enum_values += len(values)
            chars = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in values)
            text_chars += chars
            if len(values) > LARGE_ENUM_VALUES and chars > MAX_LARGE_ENUM_CHARS:
                raise ConstraintError(
                    f"an enum of {len(values)} values has {chars} characters; OpenAI's limit for an enum of more "
                    f"than {LARGE_ENUM_VALUES} values is {MAX_LARGE_ENUM_CHARS} characters", code="schema_too_large")
        if "const" in node:
            const = node["const"]
            text_chars += len(const) if isinstance(const, str) else len(json.dumps(const))
    for count, limit, what in ((properties, MAX_PROPERTIES, "object properties"),
                               (depth, MAX_DEPTH, "levels of nesting"),
                               (enum_values, MAX_ENUM_VALUES, "enum values"),
                               (text_chars, MAX_TEXT_CHARS,
                                "characters of property names, definition names, enum and const values")):
        if count > limit:
            raise ConstraintError(f"the schema has {count} {what}; OpenAI's limit is {limit}",
                                  code="schema_too_large")


def _subschemas(node: Any, level: int) -> Iterator[tuple[dict[str, Any], int]]:
    """Every schema object inside `node` with its nesting level (objects and arrays add one)."""
    if not isinstance(node, dict):
        return
    yield node, level
    nested = level + 1 if (node.get("type") in ("object", "array") or "properties" in node or "items" in node) \
        else level
    for value in (node.get("properties") or {}).values() if isinstance(node.get("properties"), dict) else ():
        yield from _subschemas(value, nested)
    for key in ("items", "additionalProperties", "not"):
        yield from _subschemas(node.get(key), nested)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for value in node.get(key) or () if isinstance(node.get(key), list) else ():
            yield from _subschemas(value, level)
    for key in ("$defs", "definitions"):
        for value in (node.get(key) or {}).values() if isinstance(node.get(key), dict) else ():
            yield from _subschemas(value, 1)
