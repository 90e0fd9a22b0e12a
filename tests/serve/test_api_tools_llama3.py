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


PYTHON_TAG = "<|python_tag|>"


@pytest.fixture(scope="module")
def tag_engine(tmp_path_factory):
    """The engine on a tiny Llama 3.1-templated model that opens every answer it may with the
    special token <|python_tag|> and then `{` (tests/tiny_model.py), as Llama 3.1 calls tools."""
    from tiny_model import save_tiny_llama3_python_tag_model

    from tunesmith.generate.engine import LocalEngine

    eng = LocalEngine.load(str(save_tiny_llama3_python_tag_model(tmp_path_factory.mktemp("tiny-llama3-tag"))))
    yield eng
    eng.close()


def test_a_call_opened_with_python_tag_is_held_to_the_schema_and_read_as_a_call_whole_and_streamed(tag_engine,
                                                                                                   tmp_path):
    """The model writes the real token: with auto it opens the call, which is held to the schema
    and comes back as tool_calls, not content, whole and streamed (the engine's text leaves
    special tokens out); with required and a named function the tag may come first as well."""
    from openai import OpenAI

    from tunesmith.generate.requests import SamplingParams
    from tunesmith.serve import protocol as p
    from tunesmith.serve.app import create_app
    from tunesmith.serve.tools import plan
    from tunesmith.settings import Settings

    tag = tag_engine.tokenizer.convert_tokens_to_ids(PYTHON_TAG)
    named = {"type": "function", "function": {"name": "weather"}}
    settings = Settings(home=tmp_path, api_key=None)
    with live_server(create_app(tag_engine, settings)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for choice in ("auto", "required", named):
            req = p.ChatCompletionRequest(model=tag_engine.base_id, messages=ASK, tools=TOOLS, tool_choice=choice)
            held = plan(req, False, tag_engine.tool_syntax).constraint
            done = tag_engine.generate_batch([tag_engine.render_chat(ASK, TOOLS)], tag_engine.base_id,
                                             SamplingParams(60, 0.0, constraint=held))[0]
            assert done.token_ids[0] == tag and done.text.startswith('{"name": '), (choice, done)
            kwargs = dict(model=tag_engine.base_id, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60,
                          temperature=0)
            whole = client.chat.completions.create(**kwargs)
            _check_call(whole.choices[0])
            assert whole.usage.completion_tokens == len(done.token_ids)  # the same answer, its tag included
            if choice == named:
                assert whole.choices[0].message.tool_calls[0].function.name == "weather"
            calls, finish, content = {}, None, ""
            for chunk in client.chat.completions.create(**kwargs, stream=True):
                delta = chunk.choices[0].delta
                content += delta.content or ""
                for call in delta.tool_calls or []:
                    if call.index not in calls:
                        calls[call.index] = call
                    else:
                        calls[call.index].function.arguments += call.function.arguments
                finish = chunk.choices[0].finish_reason or finish
            assert finish == "tool_calls" and content == ""
            assert [(c.function.name, json.loads(c.function.arguments)) for c in calls.values()] == \
                [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]


def test_python_tag_opens_a_call_held_to_the_schema_or_with_auto_a_builtin_tools_text(llama3_engine):
    """Fed the real token id: after <|python_tag|> a call must be valid; with auto, text that is
    no call may follow it instead (a built-in tool's call, content for OpenAI's API); the tag
    comes once, first, and never before whitespace or after text."""
    from tunesmith.serve import protocol as p
    from tunesmith.serve.tools import plan

    tok = llama3_engine.tokenizer
    tag = tok.convert_tokens_to_ids(PYTHON_TAG)
    assert PYTHON_TAG in [str(t) for t in tok.added_tokens_decoder.values() if t.special]  # as Llama 3.1's

    def accepts(constraint, ids: list[int], whole: bool = True) -> bool:
        matcher = llama3_engine.compile(constraint).deep_copy()
        return matcher.consume_tokens(ids) and not matcher.is_error() and (matcher.is_accepting() or not whole)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    call = '{"name": "weather", "parameters": {"city": "Paris"}}'
    builtin = 'brave_search.call(query="weather in Paris")'
    named = {"type": "function", "function": {"name": "weather"}}
    constraints = {choice if isinstance(choice, str) else "named": plan(p.ChatCompletionRequest(
        model="tools", messages=ASK, tools=TOOLS, tool_choice=choice), False, llama3_engine.tool_syntax).constraint
        for choice in ("auto", "required", named)}
    for name, constraint in constraints.items():
        assert accepts(constraint, [tag] + ids(call)) and accepts(constraint, ids(call)), name
        for bad in ('{"name": "weather", "parameters": {"city": "Lyon', '{"city": "Paris"}', " " + call):
            assert not accepts(constraint, [tag] + ids(bad), whole=False), (name, bad)
        assert not accepts(constraint, [tag, tag], whole=False), name
        assert accepts(constraint, [tag] + ids(builtin)) == (name == "auto"), name
    assert not accepts(constraints["auto"], ids("It is sunny") + [tag], whole=False)


def test_a_llama3_template_on_a_tokenizer_without_python_tag_gets_a_grammar_without_it(tiny_model_dir):
    """A grammar that names a special token the tokenizer lacks does not compile, so the tag is
    allowed only where the tokenizer has it (here the ChatML tiny model's, given Llama's template)."""
    from dataclasses import replace

    import llguidance
    import llguidance.hf
    from tiny_model import LLAMA31_JSON_TEMPLATE
    from transformers import AutoTokenizer

    from tunesmith.data.tool_format import tool_syntax
    from tunesmith.serve import protocol as p
    from tunesmith.serve.tools import plan

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = LLAMA31_JSON_TEMPLATE
    syntax = tool_syntax(tok)
    assert syntax.name == "llama3_json" and syntax.call_token == ""
    req = p.ChatCompletionRequest(model="tools", messages=ASK, tools=TOOLS)
    ll_tokenizer = llguidance.hf.from_tokenizer(tok)
    for syntax, compiles in ((syntax, True), (replace(syntax, call_token=PYTHON_TAG), False)):
        matcher = llguidance.LLMatcher(ll_tokenizer, plan(req, False, syntax).constraint.grammar(), log_level=0)
        assert matcher.is_error() != compiles, matcher.get_error()
