"""Tool calling with the official openai client against a model whose chat template is
Llama 3.1's JSON one (the tiny random Llama of tests/tiny_model.py): the calls come back
as OpenAI's `tool_calls`, whole and streamed, their arguments valid for the schema, and the
conversation with the call and its result goes on."""

from __future__ import annotations

import json
from typing import Iterator

import jsonschema
import pytest
from serve_helpers import ALARM, ASK, SCHEMAS, TOOLS, WEATHER, live_server  # noqa: F401


@pytest.fixture(scope="module")
def client(llama3_engine, tmp_path_factory) -> Iterator:
    from openai import OpenAI

    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), api_key=None)
    with live_server(create_app(llama3_engine, settings)) as url:
        yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _check_call(choice) -> None:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls  # the template writes one call per message
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_return_one_valid_call(client):
    for model, seed in (("tools", 1), ("tools", 2), ("base", 3)):
        model = model if model == "tools" else client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=1.0, seed=seed, max_tokens=60)
        _check_call(resp.choices[0])  # parallel_tool_calls defaults to true: it allows, never asks for, more
    named = {"type": "function", "function": {"name": "alarm"}}
    resp = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, tool_choice=named, n=2,
                                          temperature=1.0, seed=4, max_tokens=60)
    for choice in resp.choices:
        _check_call(choice)
        assert choice.message.tool_calls[0].function.name == "alarm"


def test_a_streamed_call_accumulates_to_the_whole_answers(client):
    """The accumulation loop of OpenAI's function-calling guide, unchanged."""
    kwargs = dict(model="tools", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    _check_call(whole)
    final_tool_calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tool_call in delta.tool_calls or []:
            if tool_call.index not in final_tool_calls:
                final_tool_calls[tool_call.index] = tool_call
            else:
                final_tool_calls[tool_call.index].function.arguments += tool_call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final_tool_calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_auto_is_text_or_a_valid_call_and_the_call_and_its_result_are_the_next_turn(client, llama3_engine):
    for seed in range(1, 7):
        kwargs = dict(model="tools", messages=ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed)
        choice = client.chat.completions.create(**kwargs).choices[0]
        if choice.message.tool_calls:
            _check_call(choice)
        else:  # an answer that does not open with `{` is text, never a call
            assert choice.message.content and not choice.message.content.lstrip().startswith("{")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
        assert streamed == (choice.message.content or "")
    answer = client.chat.completions.create(model="tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=60, temperature=0).choices[0].message
    turn = ASK + [answer, {"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "18 C"}]
    again = client.chat.completions.create(model="tools", messages=turn, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")
    call = answer.tool_calls[0].function
    sent = [ASK[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]}, turn[-1]]
    prompt = llama3_engine.render_chat(sent, TOOLS)
    assert again.usage.prompt_tokens == len(prompt)
    text = llama3_engine.tokenizer.decode(prompt)
    assert f'{{"name": "{call.name}", "parameters": {call.arguments}}}<|eot_id|>' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "18 C"}<|eot_id|>' in text


def test_with_auto_a_call_is_held_to_the_schema_from_its_opening_brace(llama3_engine):
    """The tiny model almost never opens a call by itself (`{` is 1 token in 1,000), so the
    auto grammar is checked directly: text, or one whole valid call and nothing after it."""
    from generate_helpers import starts_a_match

    from tunesmith.serve import protocol as p
    from tunesmith.serve.tools import plan

    req = p.ChatCompletionRequest(model="tools", messages=ASK, tools=TOOLS)
    auto = plan(req, False, llama3_engine.tool_syntax).constraint
    tok = llama3_engine.tokenizer
    call = '{"name": "weather", "parameters": {"city": "Paris"}}'
    matcher = llama3_engine.compile(auto).deep_copy()
    assert matcher.consume_tokens(tok(call, add_special_tokens=False)["input_ids"]) and matcher.is_accepting()
    assert starts_a_match(tok, auto, "It is sunny {in} Paris.")
    for bad in ('{"name": "weather", "parameters": {"city": "Lyon', '{"city": "Paris"}', '{"name": "forecast"',
                ' {"name": "weather"', call + " and more", call + "; " + call):
        assert not starts_a_match(tok, auto, bad), bad
