"""JSON mode through the HTTP API with the official openai client: `response_format`
json_object and json_schema, streamed and not, and the schemas it refuses."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_helpers import TICKET

from tunesmith.generate.json_mode import JsonPrefix


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
    plain = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "text"}, max_tokens=4, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_json_schema_through_the_api(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "strict": True, "schema": TICKET}}
    for model, seed in (("beta", 1), (engine.base_id, 2)):
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Route this ticket."}],
                                              response_format=fmt, max_tokens=120, temperature=1.0, seed=seed)
        choice = resp.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), TICKET)
        else:
            assert JsonPrefix(TICKET).feed(choice.message.content), choice.message.content
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
    with pytest.raises(openai.BadRequestError, match="not not supported") as err:
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], response_format=bad)
    assert err.value.code == "unsupported_schema" and err.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="needs 'json_schema'"):
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema"})
