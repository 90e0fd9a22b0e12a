"""Character-level matchers for JSON values, optionally held to a JSON Schema.

`compile_schema` turns a schema into a factory of matchers; a matcher reads a value one
character at a time (`step` says whether the character can continue it) and knows whether
the value may end where it is (`can_end`) or must (`finished`). Objects and arrays hold a
matcher for the value they are reading; `anyOf`, a list of types and `enum` become a set of
alternatives read side by side. This is what JSON mode (`generate/json_mode.py`) runs.

The subset is that of OpenAI's structured outputs: `type` (object, array, string, number,
integer, boolean, null, or a list of them), `properties`, `required`,
`additionalProperties`, `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`, and
`$ref` into `$defs`/`definitions`. Keywords that constrain a value's content (`pattern`,
`format`, `minimum`, `maxLength`, ...) are not enforced, and `compile_schema` names what it
cannot honour rather than ignore it silently.

    python -c "from tunesmith.generate.json_schema import compile_schema; m = compile_schema({'type': 'object'})(); print(all(m.step(c) for c in '{}'), m.finished)"
"""

from __future__ import annotations

import json
from typing import Any, Callable

WHITESPACE = " \t\n\r"
MAX_WHITESPACE_RUN = 64
"""Longest run of whitespace accepted: room for indentation, not for a model stuck emitting newlines."""
MAX_DEPTH = 64
"""Deepest nesting of objects and arrays followed (recursive schemas included)."""

IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "strict", "name",
           "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
           "minLength", "maxLength", "minProperties", "maxProperties", "$defs", "definitions"}
"""Keywords accepted without being enforced (annotations and content constraints)."""
HONOURED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const", "anyOf", "$ref"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A schema this reader cannot hold a value to; the message says what and where."""


Factory = Callable[[int], "Matcher"]
"""Makes a fresh matcher for a value at a given nesting depth."""


class Matcher:
    finished = False
    """The value is complete and can take no more characters."""
    can_end = False
    """The value is complete here (a number may also go on)."""
    free_text = False
    """Inside a string that takes any character next (not a key or enum held to names)."""

    def step(self, ch: str) -> bool:
        raise NotImplementedError

    def copy(self) -> "Matcher":
        raise NotImplementedError


# ----------------------------------------------------------------------------- scalars


class Literals(Matcher):
    """One of a few fixed texts: true, false, null, or an enum's values as JSON."""

    def __init__(self, texts: list[str]):
        self.texts, self.pos = texts, 0

    def step(self, ch: str) -> bool:
        left = [t for t in self.texts if len(t) > self.pos and t[self.pos] == ch]
        if not left:
            return False
        self.texts, self.pos = left, self.pos + 1
        return True

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return any(len(t) == self.pos for t in self.texts)

    @property
    def finished(self) -> bool:  # type: ignore[override]
        return all(len(t) == self.pos for t in self.texts)

    def copy(self) -> "Literals":
        new = Literals(self.texts)
        new.pos = self.pos
        return new


class String(Matcher):
    """A JSON string: escapes checked, control characters refused."""

    def __init__(self) -> None:
        self.mode, self.hex_due = "open", 0

    def step(self, ch: str) -> bool:
        mode = self.mode
        if mode == "open":
            if ch != '"':
                return False
            self.mode = "in"
        elif mode == "in":
            if ch == '"':
                self.mode = "closed"
            elif ch == "\\":
                self.mode = "escape"
            elif ord(ch) < 0x20:
                return False
        elif mode == "escape":
            if ch == "u":
                self.mode, self.hex_due = "unicode", 4
            elif ch in '"\\/bfnrt':
                self.mode = "in"
            else:
                return False
        elif mode == "unicode":
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.hex_due -= 1
            if not self.hex_due:
                self.mode = "in"
        else:
            return False
        return True

    @property
    def finished(self) -> bool:  # type: ignore[override]
        return self.mode == "closed"

    can_end = finished  # type: ignore[assignment]

    @property
    def free_text(self) -> bool:  # type: ignore[override]
        return self.mode == "in"

    def copy(self) -> "String":
        new = String()
        new.mode, new.hex_due = self.mode, self.hex_due
        return new


class Number(Matcher):
    """-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, or only its integer part."""

    _END = {"zero", "int", "frac", "exp"}

    def __init__(self, integer: bool = False):
        self.integer, self.mode = integer, "start"

    def step(self, ch: str) -> bool:
        digit = ch.isascii() and ch.isdigit()
        mode = self.mode
        if mode == "start" and ch == "-":
            self.mode = "sign"
        elif mode in ("start", "sign") and digit:
            self.mode = "zero" if ch == "0" else "int"
        elif mode in ("int", "frac", "exp") and digit:
            pass
        elif mode in ("zero", "int") and ch == "." and not self.integer:
            self.mode = "frac0"
        elif mode == "frac0" and digit:
            self.mode = "frac"
        elif mode in ("zero", "int", "frac") and ch in "eE" and not self.integer:
            self.mode = "exp0"
        elif mode == "exp0" and ch in "+-":
            self.mode = "exp1"
        elif mode in ("exp0", "exp1") and digit:
            self.mode = "exp"
        else:
            return False
        return True

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return self.mode in self._END

    def copy(self) -> "Number":
        new = Number(self.integer)
        new.mode = self.mode
        return new


# ----------------------------------------------------------------------------- containers


class _Container(Matcher):
    """Shared by objects and arrays: the opening bracket, whitespace between tokens, the
    value being read; `_token` takes the rest."""

    OPEN = ""

    def __init__(self, depth: int):
        self.depth, self.mode, self.ws, self.child = depth, "open", 0, None

    def step(self, ch: str) -> bool:
        if self.mode == "value_in":
            done = self._child_step(ch)
            if done is not None:
                return done
        space = self._space(ch)
        if space is not None:
            return space
        if self.mode == "open":
            if ch != self.OPEN:
                return False
            self.mode = "first"
            return True
        return self._token(ch)

    def _token(self, ch: str) -> bool:
        raise NotImplementedError

    def _space(self, ch: str) -> bool | None:
        """True/False for whitespace (accepted or not), None for any other character."""
        if ch not in WHITESPACE:
            self.ws = 0
            return None
        if self.mode in ("open", "closed", "value_in"):
            return False
        self.ws += 1
        return self.ws <= MAX_WHITESPACE_RUN

    def _child_step(self, ch: str) -> bool | None:
        """Feed the value being read; None when it has ended and `ch` is the container's."""
        if self.child.step(ch):
            if self.child.finished:
                self._value_done()
            return True
        if self.child.can_end:
            self._value_done()
            return None
        return False

    def _value_done(self) -> None:
        self.child, self.mode = None, "after"

    @property
    def finished(self) -> bool:  # type: ignore[override]
        return self.mode == "closed"

    can_end = finished  # type: ignore[assignment]

    @property
    def free_text(self) -> bool:  # type: ignore[override]
        return self.child is not None and self.child.free_text

    def _start(self, factory: Factory) -> bool:
        """Begin reading a value; False past MAX_DEPTH (a recursive schema is not followed further)."""
        if self.depth + 1 > MAX_DEPTH:
            return False
        self.child, self.mode = factory(self.depth + 1), "value_in"
        return True


class Object(_Container):
    OPEN = "{"

    def __init__(self, depth: int, properties: dict[str, Factory], required: set[str],
                 additional: Factory | None):
        super().__init__(depth)
        self.properties, self.required, self.additional = properties, required, additional
        self.seen: frozenset[str] = frozenset()
        self.key = ""  # the key's text as written, while it is read
        self.key_reader: String | None = None

    def _key_possible(self) -> bool:
        return self.additional is not None or any(k not in self.seen for k in self.properties)

    def _may_close(self) -> bool:
        return self.required <= self.seen

    def step(self, ch: str) -> bool:
        if self.mode == "key_in":
            return self._key_step(ch)
        return super().step(ch)

    def _token(self, ch: str) -> bool:
        mode = self.mode
        if mode in ("first", "key") and ch == '"' and self._key_possible():
            self.mode, self.key, self.key_reader = "key_in", "", String()
            self.key_reader.step('"')
        elif mode in ("first", "after") and ch == "}" and self._may_close():
            self.mode = "closed"
        elif mode == "colon" and ch == ":":
            self.mode = "value"
        elif mode == "value":
            return self._start(self._value_factory) and self.step(ch)
        elif mode == "after" and ch == "," and self._key_possible():
            self.mode = "key"
        else:
            return False
        return True

    def _key_step(self, ch: str) -> bool:
        reader = self.key_reader
        if not reader.step(ch):
            return False
        if reader.finished:
            name = _decode_key(self.key)
            if name in self.seen or (name not in self.properties and self.additional is None):
                return False
            self.seen = self.seen | {name}
            self._value_factory = self.properties.get(name, self.additional)
            self.mode, self.key_reader = "colon", None
            return True
        self.key += ch
        if self.additional is None:  # only the schema's names, written as json.dumps writes them
            return any(_key_text(k).startswith(self.key) for k in self.properties if k not in self.seen)
        return True

    @property
    def free_text(self) -> bool:  # type: ignore[override]
        if self.mode == "key_in":  # any key, or only the schema's names
            return self.additional is not None and self.key_reader.free_text
        return super().free_text

    def copy(self) -> "Object":
        new = Object.__new__(Object)
        new.__dict__.update(self.__dict__)
        new.child = self.child.copy() if self.child is not None else None
        new.key_reader = self.key_reader.copy() if self.key_reader is not None else None
        return new


class Array(_Container):
    OPEN = "["

    def __init__(self, depth: int, items: Factory, min_items: int = 0, max_items: int | None = None):
        super().__init__(depth)
        self.items, self.min_items, self.max_items, self.count = items, min_items, max_items, 0

    def _token(self, ch: str) -> bool:
        mode = self.mode
        if mode in ("first", "after") and ch == "]" and self.count >= self.min_items:
            self.mode = "closed"
        elif mode == "after" and ch == "," and (self.max_items is None or self.count < self.max_items):
            self.mode = "value"
        elif mode in ("first", "value") and (self.max_items is None or self.count < self.max_items):
            if not self._start(self.items) or not self.child.step(ch):
                return False
            self.count += 1
            if self.child.finished:
                self._value_done()
        else:
            return False
        return True

    def copy(self) -> "Array":
        new = Array.__new__(Array)
        new.__dict__.update(self.__dict__)
        new.child = self.child.copy() if self.child is not None else None
        return new


class AnyOf(Matcher):
    """Alternatives read side by side; those that cannot take a character drop out."""

    def __init__(self, options: list[Matcher]):
        self.options = options

    def step(self, ch: str) -> bool:
        left = []
        for m in self.options:
            m = m.copy()
            if m.step(ch):
                left.append(m)
        if not left:
            return False
        self.options = left
        return True

    @property
    def can_end(self) -> bool:  # type: ignore[override]
        return any(m.can_end for m in self.options)

    @property
    def finished(self) -> bool:  # type: ignore[override]
        return all(m.finished for m in self.options)

    @property
    def free_text(self) -> bool:  # type: ignore[override]
        return any(m.free_text for m in self.options)

    def copy(self) -> "AnyOf":
        return AnyOf([m.copy() for m in self.options])


def _key_text(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)[1:-1]


def _decode_key(written: str) -> str:
    return json.loads('"' + written + '"')


# ----------------------------------------------------------------------------- schemas


def compile_schema(schema: dict[str, Any] | None) -> Factory:
    """A factory of matchers for values of `schema` (None: any JSON value). Raises
    SchemaError for what cannot be honoured, with the schema path."""
    root = schema if schema is not None else {}
    cache: dict[int, Factory] = {}

    def build(node: Any, where: str) -> Factory:
        if node is True or node == {}:
            return _any_value
        if not isinstance(node, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {json.dumps(node)[:60]}")
        key = id(node)
        if key in cache:
            return cache[key]
        cache[key] = lambda depth: made(depth)  # placeholder, so recursive $refs resolve lazily
        unknown = sorted(set(node) - HONOURED - IGNORED)
        if unknown:
            raise SchemaError(f"{where}: {', '.join(unknown)} not supported (supported: {', '.join(sorted(HONOURED))})")
        made = _build_node(node, where, build, root)
        cache[key] = made
        return made

    return build(root, "schema")


def _build_node(node: dict[str, Any], where: str, build: Callable[[Any, str], Factory], root: dict) -> Factory:
    if "$ref" in node:
        if len(set(node) - IGNORED) > 1:
            raise SchemaError(f"{where}: $ref beside other keywords is not supported")
        return build(_resolve_ref(node["$ref"], root, where), node["$ref"])
    if "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{where}.enum: must be a non-empty list")
        texts = sorted({form for v in values for form in (json.dumps(v), json.dumps(v, separators=(",", ":")),
                                                          json.dumps(v, ensure_ascii=False))})
        return lambda depth: Literals(texts)
    if "anyOf" in node:
        if not isinstance(node["anyOf"], list) or not node["anyOf"]:
            raise SchemaError(f"{where}.anyOf: must be a non-empty list of schemas")
        options = [build(s, f"{where}.anyOf[{i}]") for i, s in enumerate(node["anyOf"])]
        return lambda depth: AnyOf([f(depth) for f in options])
    kinds = node.get("type")
    if kinds is None:
        if "properties" in node:
            kinds = "object"
        elif "items" in node:
            kinds = "array"
        else:
            return _any_value
    if isinstance(kinds, list):
        if not kinds:
            raise SchemaError(f"{where}.type: an empty list allows nothing")
        options = [_build_type(k, node, where, build) for k in kinds]
        return options[0] if len(options) == 1 else (lambda depth: AnyOf([f(depth) for f in options]))
    return _build_type(kinds, node, where, build)


def _build_type(kind: Any, node: dict[str, Any], where: str, build: Callable[[Any, str], Factory]) -> Factory:
    if kind not in TYPES:
        raise SchemaError(f"{where}.type: unknown type {json.dumps(kind)}; one of {', '.join(TYPES)}")
    if kind == "object":
        props = node.get("properties") or {}
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties: must be an object of schemas")
        properties = {name: build(s, f"{where}.properties.{name}") for name, s in props.items()}
        required = set(node.get("required") or [])
        missing = sorted(required - set(properties))
        extra = node.get("additionalProperties", True)
        if missing and extra is False:
            raise SchemaError(f"{where}.required: {', '.join(missing)} not in properties, and no other key is allowed")
        additional = None if extra is False else build(extra, f"{where}.additionalProperties")
        return lambda depth: Object(depth, properties, required, additional)
    if kind == "array":
        items = build(node.get("items", {}), f"{where}.items")
        lo, hi = node.get("minItems", 0), node.get("maxItems")
        return lambda depth: Array(depth, items, lo, hi)
    if kind == "string":
        return lambda depth: String()
    if kind in ("number", "integer"):
        integer = kind == "integer"
        return lambda depth: Number(integer)
    texts = ["true", "false"] if kind == "boolean" else ["null"]
    return lambda depth: Literals(texts)


def _resolve_ref(ref: Any, root: dict[str, Any], where: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise SchemaError(f"{where}.$ref: only references inside the schema (#/$defs/...) are supported, got {ref!r}")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"{where}.$ref: {ref} points at nothing in the schema")
        node = node[part]
    return node


def _any_value(depth: int) -> Matcher:
    """Any JSON value: which kind is settled by its first character."""
    return AnyOf([Object(depth, {}, set(), _any_value), Array(depth, _any_value), String(), Number(),
                  Literals(["true", "false", "null"])])
