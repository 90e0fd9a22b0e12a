"""Tool calling through the HTTP API with the official openai client, as OpenAI's function
calling guide uses it: `tools`, each `tool_choice`, `parallel_tool_calls`, answers with
`tool_calls` whole and streamed (accumulated as the guide does), the next turn with the
calls and their results, and the requests refused."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from serve_helpers import ALARM, ASK, SCHEMAS, TOOLS, WEATHER  # noqa: F401 (shared with the Llama 3 tests)


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_and_named_tool_choice_always_call_with_valid_arguments(client):
    for seed in (1, 2, 3):
        resp = client.chat.completions.create(model="beta", messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=1.0, seed=seed, max_tokens=120)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        _check_calls(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "alarm"}}
    resp = client.chat.completions.create(model="beta", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=120,
                                          temperature=1.0, seed=4, n=2)
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["alarm"]  # one: a named choice
        _check_calls(choice.message.tool_calls)
    resp = client.chat.completions.create(model="alpha", messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=5)
    assert len(resp.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_accumulate_to_the_whole_answer(client):
    """The accumulation loop of OpenAI's function-calling guide, unchanged."""
    kwargs = dict(model="beta", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    stream = client.chat.completions.create(**kwargs, stream=True)
    final_tool_calls = {}
    finish = None
    for chunk in stream:
        for tool_call in chunk.choices[0].delta.tool_calls or []:
            index = tool_call.index
            if index not in final_tool_calls:
                final_tool_calls[index] = tool_call
            else:
                final_tool_calls[index].function.arguments += tool_call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    streamed = [final_tool_calls[i] for i in sorted(final_tool_calls)]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_auto_answers_text_or_valid_calls_and_the_next_turn_takes_the_results(client):
    for model, seed in (("alpha", 1), ("beta", 2), ("gamma", 3), ("beta", 4)):
        choice = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=60,
                                                temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert "<tool_call>" not in choice.message.content
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    resp = client.chat.completions.create(model="alpha", messages=turn, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason in ("stop", "length")
    # As OpenAI's guide goes on: the answer's message object itself appended, then the result.
    answer = client.chat.completions.create(model="beta", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=120, temperature=0).choices[0].message
    turn = ASK + [answer, {"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "sunny"}]
    again = client.chat.completions.create(model="beta", messages=turn, tools=[WEATHER], tool_choice="none",
                                           max_tokens=4)
    assert again.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > client.chat.completions.create(
        model="alpha", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens


def test_tool_requests_that_cannot_be_honoured_are_400s(client):
    for kwargs, message, param in (
        (dict(tool_choice="required"), "only allowed when 'tools' are given", "tool_choice"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "names function 'nope', which is not in 'tools'", "tool_choice"),
        (dict(tools=TOOLS, response_format={"type": "json_object"}), "not both", "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"enum": list(range(1001))}}}}}]),
         "1001 enum values", "tools[0].function.parameters"),
    ):
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "json"}], **kwargs)
        assert err.value.param == param
