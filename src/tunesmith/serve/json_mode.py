"""JSON mode: `response_format: {"type": "json_object"}` constrains generation to one JSON object.

At each step the sampler's own choice is tried first (the sampled token, or the greedy one);
when its text would break the JSON, the next candidates are tried in the model's order
(resampled without the rejected ones, then by probability, then the whole vocabulary by
logit, so a valid token is always found when there is one). End of turn is
allowed only once the object is closed, and then it is the only choice, so a finished answer
always parses with `json.loads` and its value is a dict. An answer cut by max_tokens is a
prefix of one (finish_reason "length"), as with OpenAI's JSON mode.

The check is exact over the text the tokenizer decodes, so it works for any tokenizer:
`JsonPrefix` reads the text character by character (RFC 8259), and a candidate's text is
what decoding the answer with it adds. A token that ends in part of a UTF-8 character is
allowed inside a string only.

    python -c "from tunesmith.serve.json_mode import JsonPrefix; print(JsonPrefix().feed('{\"a\": [1, 2'))"
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

WHITESPACE = " \t\n\r"
MAX_WHITESPACE_RUN = 64
"""Longest run of whitespace accepted: room for indentation, not for a model stuck emitting newlines."""
SCAN_LIMIT = 256
"""Most probable candidates tried before the rest of the vocabulary, by logit."""
RESAMPLES = 8
"""Times a rejected sample is drawn again (without the rejected tokens) before the ranked scan."""

_NUMBER_END = {"n_zero", "n_int", "n_frac", "n_exp"}
"""Number states in which the number may end."""
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}


class JsonPrefix:
    """Is the text fed so far the start of one JSON object? `feed` says whether it still is."""

    __slots__ = ("stack", "mode", "aux", "ws")

    def __init__(self) -> None:
        self.stack: list[str] = []  # "o" object, "a" array
        self.mode = "start"
        self.aux: Any = None  # string: is it a key; literal: the letters still due; \u: hex digits due
        self.ws = 0

    def copy(self) -> "JsonPrefix":
        new = JsonPrefix.__new__(JsonPrefix)
        new.stack, new.mode, new.aux, new.ws = list(self.stack), self.mode, self.aux, self.ws
        return new

    @property
    def complete(self) -> bool:
        return self.mode == "done"

    @property
    def in_string(self) -> bool:
        return self.mode in ("string", "escape", "unicode")

    def feed(self, text: str) -> bool:
        return all(self._step(ch) for ch in text)

    # ------------------------------------------------------------------ the automaton

    def _step(self, ch: str) -> bool:
        mode = self.mode
        if mode in ("string", "escape", "unicode"):
            return self._string(ch)
        if mode.startswith("n_"):
            if self._number(ch):
                return True
            if mode not in _NUMBER_END:
                return False
            self._after_value()  # the number ended: ch belongs to what follows it
            return self._step(ch)
        if mode == "literal":
            if ch != self.aux[0]:
                return False
            self.aux = self.aux[1:]
            if not self.aux:
                self._after_value()
            return True
        if ch in WHITESPACE:
            if mode in ("start", "done"):
                return False
            self.ws += 1
            return self.ws <= MAX_WHITESPACE_RUN
        self.ws = 0
        if mode == "start":
            return ch == "{" and self._open("o")
        if mode in ("key_or_end", "key"):
            if ch == "}" and mode == "key_or_end":
                return self._close("o")
            if ch == '"':
                self.mode, self.aux = "string", True
                return True
            return False
        if mode == "colon":
            if ch == ":":
                self.mode = "value"
                return True
            return False
        if mode in ("value", "value_or_end"):
            if ch == "]" and mode == "value_or_end":
                return self._close("a")
            return self._value(ch)
        if mode == "after_value":
            top = self.stack[-1]
            if ch == ",":
                self.mode = "key" if top == "o" else "value"
                return True
            return ch == ("}" if top == "o" else "]") and self._close(top)
        return False  # "done": nothing may follow the object

    def _value(self, ch: str) -> bool:
        if ch == "{":
            return self._open("o")
        if ch == "[":
            return self._open("a")
        if ch == '"':
            self.mode, self.aux = "string", False
            return True
        if ch == "-":
            self.mode = "n_sign"
            return True
        if ch.isascii() and ch.isdigit():
            self.mode = "n_zero" if ch == "0" else "n_int"
            return True
        if ch in _LITERALS:
            self.mode, self.aux = "literal", _LITERALS[ch]
            return True
        return False

    def _string(self, ch: str) -> bool:
        if self.mode == "escape":
            if ch == "u":
                self.mode, self.aux = "unicode", (self.aux, 4)
                return True
            self.mode = "string"
            return ch in '"\\/bfnrt'
        if self.mode == "unicode":
            is_key, due = self.aux
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.mode, self.aux = ("string", is_key) if due == 1 else ("unicode", (is_key, due - 1))
            return True
        if ch == '"':
            if self.aux:
                self.mode = "colon"
            else:
                self._after_value()
            return True
        if ch == "\\":
            self.mode = "escape"
            return True
        return ord(ch) >= 0x20  # control characters must be escaped

    def _number(self, ch: str) -> bool:
        """Advance inside a number; False when ch cannot continue it."""
        digit = ch.isascii() and ch.isdigit()
        mode = self.mode
        if mode == "n_sign" and digit:
            self.mode = "n_zero" if ch == "0" else "n_int"
        elif mode in ("n_int", "n_frac", "n_exp") and digit:
            pass
        elif mode in ("n_zero", "n_int") and ch == ".":
            self.mode = "n_frac0"
        elif mode == "n_frac0" and digit:
            self.mode = "n_frac"
        elif mode in ("n_zero", "n_int", "n_frac") and ch in "eE":
            self.mode = "n_exp0"
        elif mode == "n_exp0" and ch in "+-":
            self.mode = "n_exp1"
        elif mode in ("n_exp0", "n_exp1") and digit:
            self.mode = "n_exp"
        else:
            return False
        return True

    def _open(self, kind: str) -> bool:
        self.stack.append(kind)
        self.mode = "key_or_end" if kind == "o" else "value_or_end"
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack.pop()
        self._after_value()
        return True

    def _after_value(self) -> None:
        self.mode = "after_value" if self.stack else "done"
        self.aux, self.ws = None, 0


# ----------------------------------------------------------------------------- picking tokens


def candidates(first: int, logits: Any, probs: Any, generator: Any) -> Iterator[int]:
    """Tokens in the order the sampler would take them: `first` (its choice), then with
    sampling a few fresh draws without the tokens already tried, then the most probable,
    then every token by logit (those top_p cut off, and the long tail)."""
    import torch

    tried = {first}
    yield first
    if probs is not None:
        probs = probs.clone()
        for _ in range(RESAMPLES):
            probs[list(tried)] = 0.0
            if float(probs.sum()) <= 0.0:
                break
            tok = int(torch.multinomial(probs, 1, generator=generator)[0])
            tried.add(tok)
            yield tok
        for tok in probs.topk(min(SCAN_LIMIT, probs.numel())).indices.tolist():
            if tok not in tried:
                tried.add(tok)
                yield tok
    for tok in logits.argsort(descending=True).tolist():
        if tok not in tried:
            yield tok


def pick(state: JsonPrefix, text: str, out_ids: list[int], options: Iterator[int], eot: set[int],
         decode: Callable[[list[int]], str]) -> tuple[int, JsonPrefix, str] | None:
    """The first of `options` that keeps the answer a JSON object prefix, with the state and
    the text after it; None when none does. `text` is the answer's decoded text so far
    (without a trailing partial character), which `state` has read."""
    for tok in options:
        if tok in eot:
            if state.complete:
                return tok, state, text
            continue
        if state.complete:
            continue
        full = decode(out_ids + [tok])
        if not full.startswith(text):
            continue
        added = full[len(text):]
        whole = added.rstrip("\ufffd")  # a partial UTF-8 character waits for its next byte
        if not added:
            continue  # a special token that decodes to nothing
        new = state.copy()
        if new.feed(whole) and (whole == added or new.in_string):
            return tok, new, text + whole
    return None
