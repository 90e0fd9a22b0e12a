"""Structured outputs through the HTTP API with the official openai client: `response_format`
json_object and json_schema, vLLM's guided_regex and guided_choice through extra_body,
streamed and not, and the constraints refused with a 400 naming why."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from serve_helpers import TICKET

ROUTE = {"type": "object", "properties": {"intent": {"enum": ["card_arrival", "refund"]}, "urgent": {"type": "boolean"}},
         "required": ["intent", "urgent"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Reply in JSON."}]


def test_response_format_through_the_api(client, engine):
    resp = client.chat.completions.create(model="beta", messages=ASK, response_format={"type": "json_object"},
                                          max_tokens=64, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict), choice
    stream = client.chat.completions.create(model="beta", messages=ASK, response_format={"type": "json_object"},
                                            max_tokens=64, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content

    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    plain = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "text"}, max_tokens=4, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_json_schema_through_the_api(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "route", "strict": True, "schema": ROUTE}}
    resp = client.chat.completions.create(model="beta", messages=ASK, response_format=fmt, max_tokens=120,
                                          temperature=1.0, seed=1, n=3)
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), ROUTE)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys") as err:
        client.chat.completions.create(model="beta", messages=ASK, response_format=bad)
    assert err.value.code == "unsupported_schema" and err.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="needs 'json_schema'"):
        client.chat.completions.create(model="beta", messages=ASK, response_format={"type": "json_schema"})


def test_a_schema_over_openais_limits_is_a_400_naming_the_limit(client):
    for schema, limit in (
        ({"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(1001)]}}}, "1001 enum values"),
        ({"$defs": {"d": TICKET}, **{"type": "object", "properties": {f"p{i}": {} for i in range(5001)}}},
         "5009 object properties"),  # $defs count too
    ):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError, match=f"{limit}; OpenAI's limit is") as err:
            client.chat.completions.create(model="beta", messages=ASK, response_format=fmt)
        assert err.value.code == "schema_too_large" and err.value.param == "response_format.json_schema.schema"


def test_guided_regex_and_choice_through_extra_body(client, engine):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    resp = client.chat.completions.create(model=engine.base_id, messages=ASK, max_tokens=40, temperature=1.0, seed=4,
                                          n=2, extra_body={"guided_regex": pattern})
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.message.content) for c in resp.choices), resp
    labels = ["positive", "negative", "neutral"]
    stream = client.chat.completions.create(model="alpha", messages=ASK, max_tokens=40, temperature=0, stream=True,
                                            extra_body={"guided_choice": labels})
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) in labels
    assert chunks[-1].choices[0].finish_reason == "stop"
    done = client.completions.create(model="alpha", prompt=["card", "Paris"], max_tokens=40, temperature=0,
                                     extra_body={"guided_choice": labels})
    assert [c.text in labels for c in done.choices] == [True, True]

    with pytest.raises(openai.BadRequestError, match="unclosed character class") as err:
        client.chat.completions.create(model="alpha", messages=ASK, extra_body={"guided_regex": "[a-"})
    assert err.value.param == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="give one of guided_choice, response_format"):
        client.chat.completions.create(model="alpha", messages=ASK, response_format={"type": "json_object"},
                                       extra_body={"guided_choice": labels})
