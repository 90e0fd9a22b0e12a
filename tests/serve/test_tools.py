"""serve/tools.py without a server: a streamed answer read one character at a time (content
held back only while it may open a call), and answers parsed into OpenAI's tool_calls."""

from __future__ import annotations

import json

from tunesmith.data.tool_syntax import HERMES, LLAMA3_JSON, call_text
from tunesmith.serve.tools import CallStream, message

CALLS = call_text(HERMES, "weather", {"city": "Paris"}) + "\n" + call_text(HERMES, "alarm", {"on": True})


def _stream(text: str, syntax=HERMES):
    reader, deltas = CallStream(syntax), []
    for i, ch in enumerate(text):
        deltas += reader.feed(ch, i == len(text) - 1)
    return reader, deltas


def test_streamed_calls_come_out_as_openai_deltas_one_call_at_a_time():
    reader, deltas = _stream(CALLS)
    assert all(d.content is None for d in deltas)
    parts = [d.tool_calls[0] for d in deltas]
    assert [(t.index, t.id is not None, t.function.name) for t in parts] == [
        (0, True, "weather"), (0, False, None), (1, True, "alarm"), (1, False, None)]
    assert [json.loads(t.function.arguments) for t in parts[1::2]] == [{"city": "Paris"}, {"on": True}]
    assert reader.finish_reason("stop") == "tool_calls" and reader.finish_reason("length") == "length"


def test_text_streams_whole_with_a_partial_tag_held_back_until_it_is_not_one():
    text = "Use <tool to call, or <b>bold</b>."
    reader, deltas = _stream(text)
    assert "".join(d.content for d in deltas) == text and reader.finish_reason("stop") == "stop"
    held = CallStream(HERMES).feed("Use <tool_c", False)
    assert "".join(d.content for d in held) == "Use "


def test_a_finished_answer_becomes_tool_calls_or_stays_text():
    msg, reason = message(HERMES, CALLS, "stop")
    assert reason == "tool_calls" and msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("weather", {"city": "Paris"}), ("alarm", {"on": True})]
    msg, reason = message(HERMES, "<tool_call>\n{\"name\": \"weather\", \"argu", "length")
    assert reason == "length" and msg.tool_calls is None and msg.content.startswith("<tool_call>")


def test_a_bare_json_call_is_the_answer_that_opens_with_a_brace():
    """Llama 3.x's syntax: an answer whose first character other than whitespace is `{` is
    a call (held back until it parses, as content if it never does); any other is text."""
    call = call_text(LLAMA3_JSON, "weather", {"city": "Paris"})
    reader, deltas = _stream(call, LLAMA3_JSON)
    assert [(t.index, t.id is not None, t.function.name) for d in deltas for t in d.tool_calls] == [
        (0, True, "weather"), (0, False, None)]
    assert json.loads(deltas[1].tool_calls[0].function.arguments) == {"city": "Paris"}
    assert reader.finish_reason("stop") == "tool_calls" and all(d.content is None for d in deltas)
    held = CallStream(LLAMA3_JSON)
    assert held.feed("\n ", False) == [] and held.feed('{"name"', False) == []
    text = 'Sure: {"name": "weather", "parameters": {}}'
    reader, deltas = _stream(text, LLAMA3_JSON)
    assert "".join(d.content for d in deltas) == text and reader.finish_reason("stop") == "stop"
    cut = '{"name": "weather", "parameters": {"ci'
    reader, deltas = _stream(cut, LLAMA3_JSON)
    assert "".join(d.content or "" for d in deltas) == cut and reader.finish_reason("length") == "length"
    msg, reason = message(LLAMA3_JSON, cut, "length")
    assert msg.content == cut and msg.tool_calls is None
    msg, reason = message(LLAMA3_JSON, call, "stop")
    assert reason == "tool_calls" and msg.content is None and msg.tool_calls[0].function.name == "weather"
