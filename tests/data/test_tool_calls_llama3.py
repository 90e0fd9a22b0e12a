"""Llama 3.x's own tool-call syntax (Llama 3.1's JSON template, vLLM's copy, in
tests/tiny_model.py): the template renders the tools, a call as a bare
`{"name": ..., "parameters": ...}` object and a result as an `ipython` turn, and the text
trained for a call is the text serve prompts with, parses and constrains to."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tunesmith.data.formats import parse_chat
from tunesmith.data.render import IGNORE_INDEX, end_of_turn_ids, render_example, render_text
from tunesmith.data.tool_format import template_syntax, tool_syntax
from tunesmith.data.tool_syntax import HERMES, LLAMA3_JSON, call_text, parse_calls
from tunesmith.data.validate import validate_data

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
ROW = {"tools": [WEATHER], "messages": [ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT,
                                         {"role": "assistant", "content": "It is 18 C in Paris."}]}


@pytest.fixture(scope="module")
def tok(tiny_llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama3_dir))


def _dates() -> set[str]:
    """The template writes today's date (strftime_now): either side of a midnight is right."""
    return {datetime.now().strftime("%d %b %Y")}


def test_the_template_renders_tools_the_call_and_its_result_in_its_own_syntax(tok):
    assert template_syntax(tok) == tool_syntax(tok) == LLAMA3_JSON
    # Llama 3.1 ends a call with <|eom_id|> under `Environment: ipython`: it stops an answer too.
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == ["<|eot_id|>", "<|eom_id|>"]
    before = _dates()
    text = render_text(tok, parse_chat(ROW, 1, [], []).messages, [WEATHER])
    tools = json.dumps(WEATHER, indent=4)
    expected = {(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
        "You are a helpful assistant with tool calling capabilities. Only reply with a tool call if the function "
        "exists in the library provided by the user. If it doesn't exist, just reply directly in natural language. "
        "When you receive a tool call response, use the output to format an answer to the original user question."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
        f"Do not use variables.\n\n{tools}\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "18 C"}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 18 C in Paris.<|eot_id|>"
    ) for date in before | _dates()}
    assert text in expected
    assert "<tool_call>" not in text  # the default syntax is not layered on a template with its own


def test_the_call_trained_is_what_serve_prompts_with_parses_and_constrains_to(llama3_engine):
    """For the same conversation: serve's prompt is the training tokens before the call, the
    trained call is `{"name", "parameters"}` closed by <|eot_id|>, serve reads it back and its
    grammar (tool_choice required) accepts it whole; the answer after the tool's result is
    trained on serve's prompt for the OpenAI-shaped conversation (the call's arguments a string)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generate"))
    from generate_helpers import starts_a_match

    from tunesmith.generate.constraints import Constraint
    from tunesmith.serve.tools import call_grammar

    tok = llama3_engine.tokenizer
    assert llama3_engine.tool_syntax == LLAMA3_JSON
    trained = render_example(tok, parse_chat(ROW, 1, [], []))
    prompt = llama3_engine.render_chat([ASK], [WEATHER])
    assert trained.input_ids[:len(prompt)] == prompt
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    first = [t for t, label in zip(trained.input_ids[len(prompt):], trained.labels[len(prompt):]) if label != IGNORE_INDEX]
    first = first[:first.index(eot) + 1]
    assert first[-1] == eot and trained.labels[len(prompt) + len(first) - 1] == eot  # trained to stop
    text = tok.decode(first, skip_special_tokens=True)
    assert text == call_text(LLAMA3_JSON, "weather", {"city": "Paris"}) == '{"name": "weather", "parameters": {"city": "Paris"}}'
    assert parse_calls(LLAMA3_JSON, text) == ("", [("weather", {"city": "Paris"})])
    grammar = Constraint.lark(call_grammar(LLAMA3_JSON, {"weather": WEATHER["function"]["parameters"]}, False, False))
    assert starts_a_match(tok, grammar, text)
    matcher = llama3_engine.compile(grammar).deep_copy()
    assert matcher.consume_tokens(tok(text, add_special_tokens=False)["input_ids"]) and matcher.is_accepting()

    # The template writes tools with tojson: a file's key order is OpenAI's before it renders.
    shuffled = {"function": {"parameters": WEATHER["function"]["parameters"], "name": "weather"}, "type": "function"}
    assert render_example(tok, parse_chat({**ROW, "tools": [shuffled]}, 1, [], [])).input_ids == trained.input_ids

    served = llama3_engine.render_chat([ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]}, RESULT],
                                       [WEATHER])
    answer = [i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX and i >= len(prompt) + len(first)]
    assert trained.input_ids[:answer[0]] == served
    assert tok.decode(trained.input_ids[answer[0]:], skip_special_tokens=True) == "It is 18 C in Paris."


def test_what_the_template_refuses_is_a_line_error_and_auto_text_is_not_a_call(tmp_path, tiny_llama3_dir):
    two = {**ROW, "messages": [ASK, {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "c2"}]},
                               RESULT, {**RESULT, "tool_call_id": "c2"}, {"role": "assistant", "content": "Sunny."}]}
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROW] * 11 + [two]))
    report = validate_data(path, model=tiny_llama3_dir, estimate=False)
    assert [(p.line, p.code) for p in report.errors] == [(12, "template_error")]
    assert "only supports single tool-calls at once" in report.errors[0].message
    assert not [w for w in report.warnings if w.code == "tools_not_rendered"]
    for text in ('It is {"name": "weather", "parameters": {}}', '{"name": "Bob"}', '{"name": "f", "parameters": {}} ok',
                 '{"name": "weather", "parameters": {"city": "Par'):
        assert parse_calls(LLAMA3_JSON, text) == (text, [])
    assert parse_calls(LLAMA3_JSON, ' {"name": "a", "arguments": {"x": 1}}; {"name": "b", "parameters": {}}\n') == (
        "", [("a", {"x": 1}), ("b", {})])  # as vLLM's llama3_json parser reads them
    assert parse_calls(HERMES, '{"name": "weather", "parameters": {}}') == ('{"name": "weather", "parameters": {}}', [])
