"""JSON mode (`response_format` json_object and json_schema): the reader against json.loads
and jsonschema, token picking with a real byte-level tokenizer, the engine, and SmolLM2
(slow). Through the HTTP API: tests/serve/test_api_json_mode.py."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from generate_helpers import TICKET

from tunesmith.generate.engine import SamplingParams
from tunesmith.generate.json_mode import ANY_OBJECT, MAX_WHITESPACE_RUN, JsonPrefix, pick
from tunesmith.generate.json_schema import MAX_DEPTH, SchemaError, compile_schema

VALID = ['{}', '{"a": 1}', '{ "k" : "v" , "l":[ ] }', '{"a": [1, 2.5, -0.1e-3, 1E+2, true, false, null, "x\\n\\u00e9"]}',
         '{"nested": {"b": {"c": [[], {}]}}, "": ""}', '{\n  "name": "Alice",\n  "age": 30\n}']
INVALID = ['[]', '"a"', ' {}', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": 1,}', '{"a": "\x01"}', '{}{}', '{} ',
           '{"a": 1.}', '{"a": -}', "{'a': 1}", '{"a": .5}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": [1}', '{a: 1}']


def test_every_prefix_of_a_json_object_is_accepted_and_only_a_whole_one_completes():
    for text in VALID:
        for i in range(len(text)):
            state = JsonPrefix()
            assert state.feed(text[:i]) and not state.complete, (text, i)
        state = JsonPrefix()
        assert state.feed(text) and state.complete, text
    for text in INVALID:
        state = JsonPrefix()
        assert not (state.feed(text) and state.complete), text
    assert not JsonPrefix().feed('{"a":' + " " * (MAX_WHITESPACE_RUN + 1))  # a model stuck on whitespace
    assert JsonPrefix().feed('{"a":' + "[" * MAX_DEPTH) and not JsonPrefix().feed('{"a":' + "[" * (MAX_DEPTH + 1))


def test_the_automaton_agrees_with_json_loads_on_random_text():
    rng = random.Random(0)
    alphabet = '{}[]:,"ab01-.eE+ \nrtuefalsn\\'
    completed = 0
    for _ in range(100_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        state = JsonPrefix()
        done = state.feed(text) and state.complete
        try:
            value = json.loads(text)
            valid = isinstance(value, dict) and text == text.strip()
        except ValueError:
            valid = False
        assert done == valid, text
        completed += done
    assert completed > 10  # the draw does reach whole objects


def test_pick_checks_the_decoded_text_and_partial_characters(tiny_tokenizer):
    tok = tiny_tokenizer

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    def token_for(text):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    eot = {tok.convert_tokens_to_ids("<|im_end|>")}
    partial = next(i for i in range(tok.vocab_size) if decode([i]) == "\ufffd")  # a lone UTF-8 lead byte
    in_string = tok.encode('{"a": "x', add_special_tokens=False)
    state = JsonPrefix()
    assert state.feed(decode(in_string))
    # Inside a string: a brace is just text, a partial character may wait for its next byte.
    assert pick(state, decode(in_string), in_string, iter([token_for("}")]), eot, decode)[2] == '{"a": "x}'
    assert pick(state, decode(in_string), in_string, iter([partial]), eot, decode)[2] == '{"a": "x'
    assert pick(state, decode(in_string), in_string, iter(eot), eot, decode) is None  # not closed: no end of turn
    # In a key held to the schema's names a partial character could only start a loop: refused.
    in_key = tok.encode('{"in', add_special_tokens=False)
    state = JsonPrefix(TICKET)
    assert state.feed(decode(in_key))
    assert pick(state, decode(in_key), in_key, iter([partial]), eot, decode) is None
    after_value = tok.encode('{"a": 1', add_special_tokens=False)
    state = JsonPrefix()
    assert state.feed(decode(after_value))
    assert pick(state, decode(after_value), after_value, iter([partial]), eot, decode) is None
    # The sampler's first choice is skipped when it breaks the JSON, the next valid one is taken.
    tok_id, new, text = pick(state, decode(after_value), after_value, iter([token_for("{"), token_for("}")]), eot, decode)
    assert tok_id == token_for("}") and text == '{"a": 1}' and new.complete
    assert pick(new, text, after_value + [tok_id], iter([token_for(",")] + list(eot)), eot, decode)[0] in eot


def test_the_engine_answers_one_json_object(engine):
    prompt = engine.render_chat([{"role": "user", "content": "answer in json"}])
    for model in (engine.base_id, "beta"):  # beta (a random adapter) writes long strings
        for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
            text, finish, _ = engine.generate(prompt, model, SamplingParams(64, temperature, 1.0, (), seed, ANY_OBJECT))
            if finish == "stop":
                assert isinstance(json.loads(text), dict), text
            else:
                assert finish == "length" and JsonPrefix().feed(text), text
    text, finish, n = engine.generate(prompt, engine.base_id, SamplingParams(1, 0.0, json_schema=ANY_OBJECT))
    assert finish == "length" and n == 1 and text.startswith("{") and JsonPrefix().feed(text)


TICKET_OK = {"intent": "card_arrival", "confidence": 0.75, "count": 2, "tags": ["late", "card"], "refund": None,
             "customer": {"name": "Ana", "vip": True}}


def reads(schema, text) -> bool:
    state = JsonPrefix(schema)
    return state.feed(text) and state.complete


def test_a_schema_holds_keys_types_enums_and_sizes():
    for value in (TICKET_OK, {**TICKET_OK, "refund": False, "tags": ["x"], "confidence": -1e-3},
                  {**TICKET_OK, "customer": {"name": "B"}, "intent": "refund", "count": -7}):
        for text in (json.dumps(value), json.dumps(value, indent=2), json.dumps(value, separators=(",", ":"))):
            assert reads(TICKET, text), text
            for i in range(len(text)):
                assert JsonPrefix(TICKET).feed(text[:i]), (text, i)
    bad = {
        "a required key missing": {k: v for k, v in TICKET_OK.items() if k != "count"},
        "an unknown key": {**TICKET_OK, "extra": 1},
        "a value outside the enum": {**TICKET_OK, "intent": "card"},
        "a float for an integer": {**TICKET_OK, "count": 2.5},
        "too many items": {**TICKET_OK, "tags": ["a", "b", "c", "d"]},
        "too few items": {**TICKET_OK, "tags": []},
        "a string for boolean-or-null": {**TICKET_OK, "refund": "yes"},
        "a nested unknown key": {**TICKET_OK, "customer": {"name": "A", "age": 3}},
        "a nested required key missing": {**TICKET_OK, "customer": {"vip": False}},
    }
    for why, value in bad.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, TICKET)
        assert not reads(TICKET, json.dumps(value)), why
    assert not reads(TICKET, json.dumps(TICKET_OK)[:-1] + ', "count": 3}')  # a key twice


def test_whatever_the_reader_lets_through_validates(tmp_path):
    """A random walk over the characters the reader accepts: every value it completes is
    valid for jsonschema, whichever schema, including a recursive one."""
    tree = {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "properties": {"label": {"enum": ["a", "b", 3, None]},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["children"], "additionalProperties": False}}}
    loose = {"type": "object", "properties": {"n": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
             "required": ["n"], "additionalProperties": {"type": "integer"}}
    rng = random.Random(1)
    for schema in (TICKET, tree, loose, ANY_OBJECT):
        alphabet = sorted(set(json.dumps(schema)) | set('{}[]:,"-.0123456789eE+ truefalsn\\'))
        completed = 0
        for _ in range(100):
            state, text = JsonPrefix(schema), ""
            while len(text) < 200 and not (state.complete and rng.random() < 0.5):
                options = [ch for ch in alphabet if state.copy().feed(ch)]
                if not options:
                    break
                closers = [ch for ch in options if ch in '"}]']
                ch = rng.choice(closers if closers and rng.random() < 0.5 else options)
                state.feed(ch)
                text += ch
            if state.complete:
                completed += 1
                jsonschema.validate(json.loads(text), schema)
        assert completed >= 3, (schema, completed)  # the walk (seeded) does complete values


def test_schemas_the_reader_cannot_honour_are_named():
    for schema, message in (
        ({"type": "object", "not": {"type": "string"}}, r"schema: not not supported"),
        ({"type": "strin"}, r'schema.type: unknown type "strin"'),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, r"points at nothing"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"], "additionalProperties": False},
         r"schema.required: b not in properties"),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, r"schema.properties.a: oneOf"),
    ):
        with pytest.raises(SchemaError, match=message):
            compile_schema(schema)


@pytest.mark.slow
def test_smollm2_fills_a_schema(smollm2):
    """Routing a support message into a fixed schema: every answer validates."""
    from tunesmith.generate.engine import LocalEngine

    schema = {"type": "object", "properties": {
        "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "exchange_rate"]},
        "urgent": {"type": "boolean"}}, "required": ["intent", "urgent"], "additionalProperties": False}
    engine = LocalEngine.load(str(smollm2))
    try:
        prompt = engine.render_chat([{"role": "user", "content": "Classify this support message: "
                                      "'Someone stole my card, please block it now!'"}])
        for temperature, seed in ((0.0, None), (0.8, 1), (0.8, 2)):
            text, finish, _ = engine.generate(prompt, engine.base_id, SamplingParams(48, temperature, 1.0, (), seed, schema))
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), schema)
    finally:
        engine.close()


@pytest.mark.slow
def test_smollm2_in_json_mode_answers_a_parseable_object(smollm2):
    """Asked for JSON, SmolLM2 alone wraps it in prose or backticks now and then; JSON mode
    answers the object itself."""
    from tunesmith.generate.engine import LocalEngine

    engine = LocalEngine.load(str(smollm2))
    try:
        prompt = engine.render_chat([{"role": "user", "content": "Give the name and age of Alice, who is 30, as JSON."}])
        for temperature, seed in ((0.0, None), (0.8, 1), (0.8, 3)):
            text, finish, _ = engine.generate(prompt, engine.base_id, SamplingParams(96, temperature, 1.0, (), seed, ANY_OBJECT))
            assert finish == "stop", text
            value = json.loads(text)
            assert isinstance(value, dict) and "Alice" in json.dumps(value), text
    finally:
        engine.close()
