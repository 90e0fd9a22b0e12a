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


# Qwen2.5's tool rendering, cut down: tools in the system turn, calls as <tool_call> blocks
# written with tojson, tool results as user turns.
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tool_call in message.tool_calls %}{% if tool_call.function %}{% set tool_call = tool_call.function %}"
    "{% endif %}{% if not loop.first %}\n{% endif %}<tool_call>\n"
    '{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_template_with_its_own_tool_syntax_renders_the_calls_itself(tiny_tokenizer):
    """A Qwen2.5-like template gets the tools and the calls (arguments as objects, not the
    JSON strings OpenAI sends): its own text, which is the syntax serve parses."""
    from tunesmith.data.formats import parse_chat
    from tunesmith.data.render import render_text
    from tunesmith.data.tool_format import DEFAULT_SYSTEM, template_renders_tools
    from tunesmith.data.tool_syntax import HERMES, parse_calls

    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = QWEN_LIKE
    try:
        assert template_renders_tools(tok)
        text = render_text(tok, parse_chat(convo(), 1, [], []).messages, [WEATHER])
    finally:
        tok.chat_template = old
    assert DEFAULT_SYSTEM not in text and '"name": "weather"' in text.split("<|im_end|>")[0]
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert parse_calls(HERMES, text)[1] == [("weather", {"city": "Paris"})]
