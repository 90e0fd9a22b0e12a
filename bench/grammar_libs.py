"""llguidance against xgrammar on SmolLM2's tokenizer: the time to compile a constraint, and
the time to compute one step's token mask, for the constraints serve accepts (json_object,
json_schema, a regex, a choice). Each constraint walks one valid answer token by token
(mask, then consume), single-threaded, so the numbers are what one request costs the engine.

    .venv/bin/python bench/grammar_libs.py
    .venv/bin/python bench/grammar_libs.py --model smollm2-135m-instruct --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

TICKET = {"type": "object", "properties": {
    "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "exchange_rate"]},
    "urgent": {"type": "boolean"}}, "required": ["intent", "urgent"], "additionalProperties": False}
ENUM_1000 = {"type": "object", "properties": {"label": {"enum": [f"label_{i:04d}" for i in range(1000)]}},
             "required": ["label"], "additionalProperties": False}


def deep(depth: int) -> dict:
    """An object nested `depth` levels (each level one required key), the last a string."""
    schema: dict = {"type": "string"}
    for i in reversed(range(depth)):
        schema = {"type": "object", "properties": {f"k{i}": schema}, "required": [f"k{i}"],
                  "additionalProperties": False}
    return schema


def deep_value(depth: int) -> object:
    value: object = "leaf"
    for i in reversed(range(depth)):
        value = {f"k{i}": value}
    return value


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"$ref": "#/$defs/address"},
        "role": {"anyOf": [{"const": "admin"}, {"const": "user"}]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False}},
}

def at_the_limits() -> tuple[dict, object]:
    """The biggest schema OpenAI's limits allow (serve's too): 5,000 properties in all, 10
    levels deep, 1,000 enum values; and a valid answer to it."""
    inner, value = deep(9), deep_value(9)
    props: dict = {"deep": inner, "label": {"enum": [f"label_{i:04d}" for i in range(1000)]}}
    answer: dict = {"deep": value, "label": "label_0999"}
    for i in range(5000 - 9 - 2):
        props[f"field_{i:04d}"] = {"type": "integer"}
        answer[f"field_{i:04d}"] = i
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}, answer


LIMITS_SCHEMA, LIMITS_ANSWER = at_the_limits()

# (name, kind, constraint, one valid answer)
CASES = [
    ("json_object", "json", {"type": "object"}, json.dumps({"name": "Alice", "age": 30, "city": "Paris"})),
    ("ticket schema", "json", TICKET, json.dumps({"intent": "lost_or_stolen_card", "urgent": True})),
    ("person ($ref, anyOf, pattern, format)", "json", PERSON, json.dumps({
        "name": "Alice Smith", "age": 30, "email": "alice@example.com", "tags": ["a", "b"],
        "address": {"city": "Paris", "zip": "75001"}, "role": "admin"})),
    ("1,000-value enum", "json", ENUM_1000, json.dumps({"label": "label_0737"})),
    ("10-deep objects", "json", deep(10), json.dumps(deep_value(10))),
    ("at OpenAI's limits (5,000 properties)", "json", LIMITS_SCHEMA, json.dumps(LIMITS_ANSWER)),
    ("regex (phone)", "regex", r"\+?[0-9]{1,3}-[0-9]{3}-[0-9]{4}", "+1-555-0100"),
    ("choice (3 labels)", "choice", ["positive", "negative", "neutral"], "negative"),
]


MAX_STEPS = 400
"""Tokens of each answer walked (the schema at the limits has a ~40,000-token answer)."""


class Llguidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer):
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf_tokenizer)
        self.words = (self.tok.vocab_size + 31) // 32

    def compile(self, kind: str, spec):
        m = self.lib.LLMatcher
        if kind == "json":
            grammar = m.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = m.grammar_from_regex(spec)
        else:
            grammar = m.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in spec))
        matcher = m(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def walk(self, matcher, ids: list[int]) -> list[float]:
        import torch
        import llguidance.torch as lt

        mask = torch.full((1, self.words), -1, dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), matcher.get_error()
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer)
        self.tokenizer = hf_tokenizer

    def compile(self, kind: str, spec):
        # A fresh compiler per constraint: its cache would time a lookup, not a compile.
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            compiled = compiler.compile_json_schema(json.dumps(spec), strict_mode=True)
        elif kind == "regex":
            compiled = compiler.compile_regex(spec)
        else:
            compiled = compiler.compile_regex("|".join(_regex_escape(x) for x in spec))
        return self.xgr.GrammarMatcher(compiled)

    def walk(self, matcher, ids: list[int]) -> list[float]:
        mask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t), f"token {t} refused"
        return times


def _regex_escape(text: str) -> str:
    import re

    return re.escape(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3, help="compiles and walks per case; the median is shown")
    args = parser.parse_args()

    import torch

    from tunesmith.models.registry import load_tokenizer, resolve_model

    torch.set_num_threads(1)
    hf = load_tokenizer(resolve_model(args.model))
    print("| library | tokenizer set-up ms | constraint | compile ms | mask µs/step (median) | mask µs (max) | steps |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for lib_cls in (Llguidance, Xgrammar):
        t0 = time.perf_counter()
        lib = lib_cls(hf)
        setup_ms = (time.perf_counter() - t0) * 1000
        for name, kind, spec, answer in CASES:
            ids = hf(answer, add_special_tokens=False)["input_ids"][:MAX_STEPS]
            compiles, steps = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                matcher = lib.compile(kind, spec)
                compiles.append((time.perf_counter() - t0) * 1000)
                steps += lib.walk(matcher, ids)
            print(f"| {lib.name} | {setup_ms:.0f} | {name} | {statistics.median(compiles):.1f} | "
                  f"{statistics.median(steps) * 1e6:.0f} | {max(steps) * 1e6:.0f} | {len(ids)} |", flush=True)


if __name__ == "__main__":
    main()
