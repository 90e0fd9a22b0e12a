"""Tool-call training data (OpenAI's fine-tuning format with tools, assistant tool_calls and
tool results): line errors with codes for calls that cannot be trained, and parity with
serve: the text trained for a call is what serve prompts with and what its grammar allows."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.validate import validate_data

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}


def call(name: str, arguments) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def convo(arguments='{"city": "Paris"}', name: str = "weather") -> dict:
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call(name, arguments)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C in Paris."}]}


def test_calls_that_cannot_be_trained_are_line_errors_with_codes(tmp_path, tiny_model_dir):
    rows = [convo(f'{{"city": "City {i}"}}') for i in range(12)] + [convo("{city: Paris}"), convo('["Paris"]'), convo('{"town": "Paris"}'),
                                          convo(name="forecast")]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_data(path, model=tiny_model_dir, estimate=False)
    found = [(p.line, p.code, p.field) for p in report.errors]
    where = "messages[1].tool_calls[0].function"
    assert found == [(13, "arguments_not_json", f"{where}.arguments"), (14, "arguments_not_json", f"{where}.arguments"),
                     (15, "arguments_do_not_match", f"{where}.arguments"), (16, "unknown_function", f"{where}.name")]
    assert "'city' is a required property" in report.errors[2].message
    assert report.examples == 12 and not [w for w in report.warnings if w.code == "tools_not_rendered"]


def test_the_text_trained_is_the_text_serve_prompts_with_and_its_grammar_allows(tiny_model_dir, engine):
    """For the same conversation: the tokens before the trained call are serve's prompt, the
    trained call is the default syntax serve parses, and serve's grammar accepts it whole."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generate"))
    from generate_helpers import starts_a_match

    from tunesmith.data.formats import parse_chat
    from tunesmith.data.render import IGNORE_INDEX, render_example
    from tunesmith.data.tool_syntax import HERMES, call_text
    from tunesmith.generate.constraints import Constraint
    from tunesmith.serve.tools import call_grammar

    tok = engine.tokenizer
    example = parse_chat(convo(), 1, [], [])
    trained = render_example(tok, example)
    prompt = engine.render_chat([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    assert trained.input_ids[:len(prompt)] == prompt  # what serve prompts with, token for token
    first = [t for t, label in zip(trained.input_ids[len(prompt):], trained.labels[len(prompt):]) if label != IGNORE_INDEX]
    first = first[:first.index(tok.convert_tokens_to_ids("<|im_end|>"))]
    text = tok.decode(first)
    assert text == call_text(HERMES, "weather", {"city": "Paris"})
    grammar = Constraint.lark(call_grammar(HERMES, {"weather": WEATHER["function"]["parameters"]}, True, False))
    assert starts_a_match(tok, grammar, text)
    matcher_done = engine.compile(grammar).deep_copy()
    assert matcher_done.consume_tokens(tok(text, add_special_tokens=False)["input_ids"]) and matcher_done.is_accepting()
