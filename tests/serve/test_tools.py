"""serve/tools.py without a server: a streamed answer read one character at a time (content
held back only while it may open a call), and answers parsed into OpenAI's tool_calls."""

from __future__ import annotations

import json

from tunesmith.data.tool_syntax import HERMES, call_text
from tunesmith.serve.tools import CallStream, message

CALLS = call_text(HERMES, "weather", {"city": "Paris"}) + "\n" + call_text(HERMES, "alarm", {"on": True})


def _stream(text: str):
    reader, deltas = CallStream(HERMES), []
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
