"""JSON mode (`response_format: {"type": "json_object"}`): the automaton against json.loads,
token picking with a real byte-level tokenizer, the engine and the HTTP API with the
official openai client, and SmolLM2 (slow)."""

from __future__ import annotations

import json
import random

import openai
import pytest

from tunesmith.serve.engine import SamplingParams
from tunesmith.serve.json_mode import MAX_WHITESPACE_RUN, JsonPrefix, pick

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
            text, finish, _ = engine.generate(prompt, model, SamplingParams(64, temperature, 1.0, (), seed, True))
            if finish == "stop":
                assert isinstance(json.loads(text), dict), text
            else:
                assert finish == "length" and JsonPrefix().feed(text), text
    text, finish, n = engine.generate(prompt, engine.base_id, SamplingParams(1, 0.0, json_object=True))
    assert finish == "length" and n == 1 and text.startswith("{") and JsonPrefix().feed(text)


def test_response_format_through_the_api(client, engine):
    resp = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Reply in JSON."}],
                                          response_format={"type": "json_object"}, max_tokens=64, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict), choice
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Reply in JSON."}],
                                            response_format={"type": "json_object"}, max_tokens=64, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content

    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="json_schema is not supported here") as err:
        client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "json"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert err.value.param == "response_format"
    plain = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "text"}, max_tokens=4, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_smollm2_in_json_mode_answers_a_parseable_object(smollm2):
    """Asked for JSON, SmolLM2 alone wraps it in prose or backticks now and then; JSON mode
    answers the object itself."""
    from tunesmith.serve.engine import LocalEngine

    engine = LocalEngine.load(str(smollm2))
    try:
        prompt = engine.render_chat([{"role": "user", "content": "Give the name and age of Alice, who is 30, as JSON."}])
        for temperature, seed in ((0.0, None), (0.8, 1), (0.8, 3)):
            text, finish, _ = engine.generate(prompt, engine.base_id, SamplingParams(96, temperature, 1.0, (), seed, True))
            assert finish == "stop", text
            value = json.loads(text)
            assert isinstance(value, dict) and "Alice" in json.dumps(value), text
    finally:
        engine.close()
