"""JSON mode: `response_format` json_object (any object) or json_schema (a value of the schema)
constrains generation to one JSON value.

At each step the sampler's own choice is tried first (the sampled token, or the greedy one);
when its text would break the JSON, the next candidates are tried in the model's order
(resampled without the rejected ones, then by probability, then the whole vocabulary by
logit, so a valid token is always found when there is one). End of turn is
allowed only once the object is closed, and then it is the only choice, so a finished answer
always parses with `json.loads` (to a dict, or a value of the schema). An answer cut by
max_tokens is a prefix of one (finish_reason "length"), as with OpenAI's JSON mode.

The check is exact over the text the tokenizer decodes, so it works for any tokenizer:
`JsonPrefix` reads the text character by character (RFC 8259, and the schema through
`generate/json_schema.py`), and a candidate's text is
what decoding the answer with it adds. A token that ends in part of a UTF-8 character is
allowed only inside a string that takes any character (not in a key or an enum value held to
the schema's names, where it could only start a loop of partial characters).

    python -c "from tunesmith.generate.json_mode import JsonPrefix; print(JsonPrefix().feed('{\"a\": [1, 2'))"
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from tunesmith.generate.json_schema import MAX_WHITESPACE_RUN, Factory, compile_schema  # noqa: F401

SCAN_LIMIT = 256
"""Most probable candidates tried before the rest of the vocabulary, by logit."""
RESAMPLES = 8
"""Times a rejected sample is drawn again (without the rejected tokens) before the ranked scan."""
ANY_OBJECT = {"type": "object"}
"""JSON mode's schema: any object."""


def response_format(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `response_format` that asks an OpenAI-compatible server for answers of `schema`
    (as json_schema, which unlike json_object does not need the word JSON in the prompt)."""
    if schema is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


class JsonPrefix:
    """Is the text fed so far the start of one JSON value of `schema` (default: any object)?
    `feed` says whether it still is; `complete` whether the value may end here."""

    __slots__ = ("root",)

    def __init__(self, schema: dict[str, Any] | None = None, factory: Factory | None = None):
        self.root = (factory or compile_schema(schema if schema is not None else ANY_OBJECT))(0)

    def copy(self) -> "JsonPrefix":
        new = JsonPrefix.__new__(JsonPrefix)
        new.root = self.root.copy()
        return new

    @property
    def complete(self) -> bool:
        return self.root.can_end

    @property
    def free_text(self) -> bool:
        """Inside a string that takes any character next: where a partial UTF-8 character may wait."""
        return self.root.free_text

    def feed(self, text: str) -> bool:
        return all(self.root.step(ch) for ch in text)


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
        if new.feed(whole) and (whole == added or new.free_text):
            return tok, new, text + whole
    return None


class JsonAnswer:
    """One answer being generated in JSON mode: what it has read so far, and the next token."""

    def __init__(self, schema: dict[str, Any] | None = None, factory: Factory | None = None):
        self.state, self.text = JsonPrefix(schema, factory), ""

    def next_token(self, first: int, logits: Any, probs: Any, generator: Any, out_ids: list[int], eot: set[int],
                   decode: Callable[[list[int]], str]) -> int:
        """The sampler's token `first` if it keeps the answer valid, else the next one in the
        sampler's order that does (see `candidates`); end of turn when none does."""
        found = pick(self.state, self.text, out_ids, candidates(first, logits, probs, generator), eot, decode)
        if found is None:  # no token continues the value: end the answer
            return min(eot)
        tok, self.state, self.text = found
        return tok
