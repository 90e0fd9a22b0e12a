"""Constrained decoding (generate/constraints.py on llguidance, masks applied in the engine's
batched step): JSON Schema, json_object, regex and choice answers from the tiny model,
constrained and free rows in one batch, OpenAI's schema limits, and SmolLM2 (slow).
Through the HTTP API: tests/serve/test_api_structured.py."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from generate_helpers import TICKET, starts_a_match

from tunesmith.generate.constraints import (
    ANY_OBJECT, MAX_DEPTH, MAX_ENUM_VALUES, MAX_PROPERTIES, Constraint, ConstraintError, check_grammar,
    check_schema_limits,
)
from tunesmith.generate.engine import SamplingParams

RUNS = [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)]


def _answers(engine, constraint, max_tokens=120, models=None):
    prompt = engine.render_chat([{"role": "user", "content": "answer in json"}])
    for model in models or (engine.base_id, "beta"):  # beta (a random adapter) writes long strings
        for temperature, seed in RUNS:
            yield engine.generate(prompt, model, SamplingParams(max_tokens, temperature, 1.0, (), seed, constraint))


ROUTE = {"type": "object", "properties": {"intent": {"enum": ["card_arrival", "refund"]}, "urgent": {"type": "boolean"}},
         "required": ["intent", "urgent"], "additionalProperties": False}


def test_json_object_and_a_schema_answer_valid_json(engine, tiny_tokenizer):
    for schema in (ANY_OBJECT, ROUTE, TICKET):
        constraint = Constraint.json_schema(schema)
        stopped = 0
        for text, finish, _ in _answers(engine, constraint, max_tokens=200):
            if finish == "stop":
                stopped += 1
                jsonschema.validate(json.loads(text), schema)
            else:  # cut by max_tokens: the start of a valid answer
                assert finish == "length" and starts_a_match(tiny_tokenizer, constraint, text), text
        # Not all cut, so whole answers were checked (the random model's free strings run on).
        assert stopped >= 2 or schema is TICKET, schema


def test_regex_and_choice_answers_match(engine):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    for text, finish, _ in _answers(engine, Constraint.regex(pattern)):
        assert finish == "stop" and re.fullmatch(pattern, text), text
    labels = ["card_arrival", "exchange_rate", "positive"]
    seen = set()
    for text, finish, _ in _answers(engine, Constraint.choice(labels)):
        assert finish == "stop" and text in labels, text
        seen.add(text)
    assert len(seen) > 1  # sampling picks among the choices, not always the first


def test_a_constrained_row_leaves_the_free_rows_of_its_batch_as_they_were(engine):
    """Free rows decoded beside constrained ones answer exactly as alone (greedy): the mask
    touches only the rows that asked for one."""
    prompts = [engine.render_chat([{"role": "user", "content": q}]) for q in ("card", "json true", "Paris?")]
    free = SamplingParams(24, 0.0)
    alone = [engine.generate(p, "alpha", free)[0] for p in prompts]
    results: dict[int, str] = {}
    done = threading.Event()
    parts: dict[int, list[str]] = {i: [] for i in range(4)}

    def collect(i):
        def on_event(ev):
            parts[i].append(ev.text)
            if ev.finish_reason:
                results[i] = "".join(parts[i])
                if len(results) == 4:
                    done.set()
        return on_event

    held = SamplingParams(24, 0.0, constraint=Constraint.choice(["positive", "negative"]))
    engine.submit(prompts[0], "alpha", held, collect(3))
    for i, p in enumerate(prompts):
        engine.submit(p, "alpha", free, collect(i))
    assert done.wait(60)
    assert [results[i] for i in range(3)] == alone
    assert results[3] in ("positive", "negative")


def test_a_constraint_is_compiled_once_and_each_row_runs_its_own_copy(engine):
    constraint = Constraint.json_schema(TICKET)
    assert engine.compile(constraint) is engine.compile(Constraint.json_schema(json.loads(json.dumps(TICKET))))
    with pytest.raises(ConstraintError, match="Unimplemented keys"):
        engine.compile(Constraint.json_schema({"type": "object", "not": {"type": "string"}}))


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"k": schema}, "required": ["k"], "additionalProperties": False}
    return schema


def test_openais_schema_limits_are_named_and_what_they_allow_compiles():
    enum = {"type": "object", "properties": {"label": {"enum": [f"l{i}" for i in range(MAX_ENUM_VALUES)]}}}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_PROPERTIES)}}
    for at_limit in (deep(MAX_DEPTH), enum, wide):
        check_schema_limits(at_limit)
        check_grammar(Constraint.json_schema(at_limit))
    over = {
        "levels of nesting; OpenAI's limit is 10": deep(MAX_DEPTH + 1),
        "1001 enum values; OpenAI's limit is 1000": {
            "type": "object", "properties": {"a": {"enum": [f"l{i}" for i in range(MAX_ENUM_VALUES)]}, "b": {"enum": ["x"]}}},
        "5001 object properties": {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}},
        "OpenAI's limit for an enum of more than 250 values is 15000 characters": {
            "enum": [f"{i:03d}" + "x" * 60 for i in range(251)]},
        "characters of property names, definition names, enum and const values": {
            "type": "object", "properties": {f"{i}" + "n" * 40_000: {"const": "c"} for i in range(3)}},
    }
    for message, schema in over.items():
        with pytest.raises(ConstraintError, match=re.escape(message)) as err:
            Constraint.json_schema(schema)
        assert err.value.code == "schema_too_large"
    with pytest.raises(ConstraintError, match="1001 choices"):
        Constraint.choice([str(i) for i in range(1001)])
    with pytest.raises(ConstraintError, match="unclosed character class"):
        check_grammar(Constraint.regex("[a-"))


@pytest.mark.slow
def test_smollm2_answers_json_a_schema_and_a_choice(smollm2):
    """Asked for JSON, SmolLM2 alone wraps it in prose or backticks now and then; held to
    json_object it answers the object itself, and held to a schema or a label set it
    always answers one."""
    from tunesmith.generate.engine import LocalEngine

    ticket = {"type": "object", "properties": {
        "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "exchange_rate"]},
        "urgent": {"type": "boolean"}}, "required": ["intent", "urgent"], "additionalProperties": False}
    engine = LocalEngine.load(str(smollm2))
    try:
        alice = engine.render_chat([{"role": "user", "content": "Give the name and age of Alice, who is 30, as JSON."}])
        card = engine.render_chat([{"role": "user", "content": "Classify this support message: "
                                    "'Someone stole my card, please block it now!'"}])
        for temperature, seed in ((0.0, None), (0.8, 1), (0.8, 3)):
            text, finish, _ = engine.generate(alice, engine.base_id, SamplingParams(
                96, temperature, 1.0, (), seed, Constraint.json_schema(ANY_OBJECT)))
            assert finish == "stop" and "Alice" in json.dumps(json.loads(text)), text
            text, finish, _ = engine.generate(card, engine.base_id, SamplingParams(
                48, temperature, 1.0, (), seed, Constraint.json_schema(ticket)))
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), ticket)
            text, finish, _ = engine.generate(card, engine.base_id, SamplingParams(
                16, temperature, 1.0, (), seed, Constraint.choice(["card_arrival", "lost_or_stolen_card"])))
            assert finish == "stop" and text in ("card_arrival", "lost_or_stolen_card"), text
    finally:
        engine.close()


def test_a_choice_singled_out_ends_without_decoding_its_forced_rest(engine):
    """Once a row's grammar leaves one way to the end, the engine writes the forced tokens and
    ends the turn without forward passes for them: the same text, no decode steps. A row cut by
    max_tokens still stops there."""
    prompt = engine.render_chat([{"role": "user", "content": "card"}])
    label = "lost_or_stolen_card because of a very long label"
    before = engine.stats()["steps"]
    text, finish, tokens = engine.generate(prompt, engine.base_id, SamplingParams(40, 0.0, constraint=Constraint.choice([label])))
    assert (text, finish) == (label, "stop") and tokens > 5
    assert engine.stats()["steps"] == before  # the prefill's first token decided it
    text, finish, tokens = engine.generate(prompt, engine.base_id, SamplingParams(3, 0.0, constraint=Constraint.choice([label])))
    assert finish == "length" and tokens == 3 and label.startswith(text) and text != label
    # Two labels sharing their start: decoding runs until they part, then the rest is forced.
    for temperature, seed in RUNS:
        text, finish, _ = engine.generate(prompt, "beta", SamplingParams(
            40, temperature, 1.0, (), seed, Constraint.choice(["card_payment_fee_charged", "card_payment_not_recognised"])))
        assert finish == "stop" and text in ("card_payment_fee_charged", "card_payment_not_recognised")
