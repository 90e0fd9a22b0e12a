"""Reading every format, and every parse-level error and warning at its exact line."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from tunesmith.data.example import Example, PreferenceExample
from tunesmith.data.formats import ColumnMapping, detect_format, iter_records, read_data
from tunesmith.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path: Path, lines: list, newline: str = "\n") -> Path:
    """Objects are dumped as JSON; strings are written as they are."""
    text = newline.join(line if isinstance(line, str) else json.dumps(line) for line in lines) + newline
    path.write_text(text, encoding="utf-8")
    return path


def codes_at(problems) -> list[tuple[int, str]]:
    return [(p.line, p.code) for p in problems]


def one_error(tmp_path: Path, bad, fmt: str | None = None) -> tuple[int, str, str]:
    """Write GOOD, blank, bad: the bad object sits on line 3."""
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", bad])
    result = read_data(path, format=fmt)
    assert len(result.errors) == 1, result.errors
    p = result.errors[0]
    return p.line, p.field, p.code


@pytest.mark.parametrize(
    "bad, field, code",
    [
        ('{"messages": [', "", "invalid_json"),
        ("[1, 2]", "", "not_an_object"),
        ({"conversation": []}, "messages", "missing_messages"),
        ({"messages": "hi"}, "messages", "messages_not_list"),
        ({"messages": ["hi", {"role": "assistant", "content": "x"}]}, "messages[0]", "message_not_object"),
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role", "missing_role"),
        ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role", "unknown_role"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content", "missing_content"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "messages[0].content", "content_not_string"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "messages[0].content", "empty_content"),
        ({"messages": [{"role": "user", "content": "hi", "contnt": "x"}, {"role": "assistant", "content": "x"}]}, "messages[0].contnt", "unknown_key"),
        ({"messages": GOOD["messages"], "extra": 1}, "extra", "unknown_key"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0.5}]}, "messages[1].weight", "invalid_weight"),
        ({"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "x"}]}, "messages[0].weight", "invalid_weight"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "messages", "no_assistant_message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}, "messages", "no_trainable_tokens"),
        ({"messages": GOOD["messages"], "tools": "search"}, "tools", "invalid_tools"),
    ],
)
def test_chat_error_codes_at_their_line(tmp_path, bad, field, code):
    assert one_error(tmp_path, bad, fmt="chat") == (3, field, code)


def test_unknown_key_suggests_the_close_match(tmp_path):
    bad = {"messages": [{"role": "user", "contnt": "hi"}, {"role": "assistant", "content": "x"}]}
    result = read_data(write_lines(tmp_path / "d.jsonl", [GOOD, bad]))
    unknown = [p for p in result.errors if p.code == "unknown_key"]
    assert unknown and "did you mean 'content'" in unknown[0].message and unknown[0].line == 2


def test_a_bad_line_never_stops_the_scan(tmp_path):
    lines = [GOOD, "not json", GOOD, {"messages": 1}, "", GOOD, "[]", GOOD]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    assert codes_at(result.errors) == [(2, "invalid_json"), (4, "messages_not_list"), (7, "not_an_object")]
    assert [ex.line for ex in result.examples] == [1, 3, 6, 8]


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=1))
    result = read_data(path, format="chat")
    assert result.errors[0].line == 1 and "JSON Lines" in result.errors[0].message


def test_last_message_not_assistant_warns(tmp_path):
    convo = {"messages": GOOD["messages"] + [{"role": "user", "content": "thanks"}]}
    result = read_data(write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, convo]))
    assert not result.errors
    assert [(p.line, p.field, p.code) for p in result.warnings] == [(3, "messages[2].role", "last_message_not_assistant")]
    assert len(result.examples) == 3


def test_invalid_encoding_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode()
    # line 1 with a BOM, CRLF endings, blank lines 2 and 4, Latin-1 bytes on line 5.
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + good + b"\r\n  \r\n" + b'{"messages": "caf\xe9"}\r\n' + good + b"\r\n")
    result = read_data(path)
    assert result.format == "chat"
    assert codes_at(result.errors) == [(5, "invalid_encoding")]
    assert [ex.line for ex in result.examples] == [1, 3, 6]
    assert result.examples[0].messages[1].content == "hello"


def test_empty_file_and_blank_only_file(tmp_path):
    for content in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        result = read_data(path)
        assert codes_at(result.errors) == [(0, "empty_file")]


def test_a_10mb_line_is_read(tmp_path):
    big = "word " * 2_000_000
    convo = {"messages": [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"}]}
    result = read_data(write_lines(tmp_path / "d.jsonl", [GOOD, convo, GOOD]))
    assert not result.errors
    assert len(result.examples[1].messages[0].content) == len(big)
    assert [ex.line for ex in result.examples] == [1, 2, 3]


def test_streaming_memory_stays_flat(tmp_path):
    """A 30 MB file is read record by record: peak Python memory is a small fraction of it."""
    path = tmp_path / "big.jsonl"
    answer = "The quick brown fox jumps over the lazy dog. " * 40  # ~1.8 KB per line
    with open(path, "w") as fh:
        for i in range(16_000):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}) + "\n")
    size = path.stat().st_size
    assert size > 28_000_000
    tracemalloc.start()
    n = 0
    for rec in iter_records(path, "chat"):
        n += rec.example is not None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 16_000
    assert peak < 2_000_000, f"peak {peak} bytes while streaming a {size}-byte file"


def test_prompt_completion_and_response(tmp_path):
    lines = [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "3+3?", "response": "6", "system": "Be terse."},
        {"prompt": "x", "completion": ""},
        {"prompt": "x", "completion": "y", "label": 1},
        {"prompt": 5, "completion": "y"},
    ]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    assert result.format == "prompt_completion"
    assert codes_at(result.errors) == [(3, "empty_content"), (4, "unknown_key"), (5, "content_not_string")]
    first, second = result.examples
    assert [(m.role, m.content, m.train) for m in first.messages] == [("user", "2+2?", False), ("assistant", "4", True)]
    assert second.messages[0].role == "system" and second.messages[-1].content == "6"


def test_alpaca_with_and_without_input(tmp_path):
    lines = [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say hi"},
    ]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    assert result.format == "alpaca"
    assert result.examples[0].messages[0].content == "Translate\n\nchat"
    assert result.examples[1].messages[0].content == "Say hi"
    assert [(p.line, p.field, p.code) for p in result.errors] == [(3, "output", "missing_content")]


def test_preference_both_dialects_and_checks(tmp_path):
    msgs = [{"role": "user", "content": "q"}]
    lines = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": "good"}],
         "non_preferred_output": [{"role": "assistant", "content": "bad"}]},
        {"input": {"messages": msgs}, "preferred_completion": "good", "non_preferred_completion": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same "},
        {"prompt": "q", "chosen": "good"},
        {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": "good"}]},
    ]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    assert result.format == "preference"
    assert [p.line for p in result.preferences] == [1, 2, 3, 4]
    assert all(isinstance(p, PreferenceExample) and p.chosen[0].content == "good" for p in result.preferences)
    assert [(p.line, p.field, p.code) for p in result.errors] == [
        (5, "rejected", "identical_answers"),
        (6, "rejected", "missing_content"),
        (7, "non_preferred_output", "missing_content"),
    ]


def test_tools_and_tool_calls_are_accepted(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "get_balance", "arguments": "{}"}}
    convo = {
        "messages": [
            {"role": "user", "content": "balance?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "assistant", "content": "You have 42."},
        ],
        "tools": [{"type": "function", "function": {"name": "get_balance", "parameters": {}}}],
    }
    result = read_data(write_lines(tmp_path / "d.jsonl", [convo]))
    assert not result.errors
    ex = result.examples[0]
    assert ex.tools and ex.messages[1].tool_calls == [call] and ex.messages[1].content == ""


def test_format_override(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    assert read_data(path).format == "prompt_completion"
    forced = read_data(path, format="chat")
    assert forced.format == "chat" and codes_at(forced.errors) == [(1, "missing_messages")]
    with pytest.raises(UsageError, match="unknown --format"):
        read_data(path, format="parquet")


def test_weight_zero_turn_is_not_trained():
    result = read_data(REPO / "examples" / "chat.jsonl")
    first = result.examples[0]
    assert [m.train for m in first.messages if m.role == "assistant"] == [False, True]


def test_csv_column_mapping_and_row_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"\xef\xbb\xbftext,category\r\n"
        b"where is my card,card_arrival\r\n"
        b"\r\n"
        b'"two\nline text",card_arrival\r\n'
        b",empty_text\r\n"
        b"bad \xff byte,x\r\n"
        b"last one,exchange_rate\r\n"
    )
    result = read_data(path, columns=ColumnMapping("text", "category", system="Route the query."))
    assert result.format == "csv"
    assert codes_at(result.errors) == [(6, "empty_content"), (7, "invalid_encoding")]
    assert [ex.line for ex in result.examples] == [2, 4, 8]
    ex = result.examples[1]
    assert [(m.role, m.content) for m in ex.messages] == [
        ("system", "Route the query."), ("user", "two\nline text"), ("assistant", "card_arrival")
    ]


def test_invalid_csv_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,category\nok,a\n"bad"quote,b\nfine,c\n"never closed,d\nlost,e\n')
    result = read_data(path, columns=ColumnMapping("text", "category"))
    assert codes_at(result.errors) == [(3, "invalid_csv"), (5, "invalid_csv")]
    assert "never closed" in result.errors[1].message
    assert [ex.line for ex in result.examples] == [2, 4]


def test_invalid_tool_calls(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": "get"}]}
    result = read_data(write_lines(tmp_path / "d.jsonl", [GOOD, bad]))
    assert [(p.line, p.field, p.code) for p in result.errors] == [(2, "messages[1].tool_calls", "invalid_tool_calls")]


def test_tsv_and_missing_column(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("q\ta\nhello\tworld\n")
    assert read_data(path, columns=ColumnMapping("q", "a")).examples[0].messages[-1].content == "world"
    with pytest.raises(UsageError, match="'category' not found; the header has 'q', 'a'"):
        read_data(path, columns=ColumnMapping("q", "category"))


def test_unreadable_paths(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_data(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="is a directory"):
        read_data(tmp_path)


def test_detect_format_skips_bad_first_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["oops", {"instruction": "i", "output": "o"}])
    assert detect_format(path) == "alpaca"


@pytest.mark.parametrize("name, fmt, n", [
    ("chat.jsonl", "chat", 12), ("prompt_completion.jsonl", "prompt_completion", 12),
    ("alpaca.jsonl", "alpaca", 11), ("preference.jsonl", "preference", 11), ("dpo.jsonl", "preference", 11),
])
def test_bundled_examples_are_valid(name, fmt, n):
    result = read_data(REPO / "examples" / name)
    assert result.format == fmt and not result.errors and not result.warnings
    assert len(result.examples) + len(result.preferences) == n >= 10
    assert all(isinstance(e, (Example, PreferenceExample)) for e in result.examples + result.preferences)


def test_hostile_lines_are_errors_at_their_line_not_tracebacks(tmp_path, monkeypatch):
    """Issue 19: a 5,000-digit number, 100,000-deep nesting and a line longer than the reader
    holds are each an error at their line; the good lines around them still parse."""
    from tunesmith.data import formats

    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 300_000)  # the limit, small enough for a test
    lines = [GOOD, '{"messages": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000,
             '{"messages": "' + "x" * 400_000 + '"}', GOOD]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    codes = {p.line: p.code for p in result.errors}
    assert codes == {2: "invalid_json", 3: "invalid_json", 4: "line_too_long"}
    assert [ex.line for ex in result.examples] == [1, 5]


def test_a_lone_surrogate_escape_is_an_error_at_its_line_and_a_pair_is_a_character(tmp_path):
    """json.loads takes "\\ud800", but no UTF-8 text holds it: the tokenizer raised a TypeError
    on it, a traceback from `tunesmith validate` and a 500 from the files API's validation."""
    chat = '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "ok"}]}'
    lines = [chat % "caf\\ud800", chat % "x\\udc00", chat % "smile \\ud83d\\ude00", chat % "a\\\\ud800"]
    result = read_data(write_lines(tmp_path / "d.jsonl", lines))
    assert [(p.line, p.code) for p in result.errors] == [(1, "invalid_json"), (2, "invalid_json")]
    column = chat.index("%s") + len("caf") + 1  # where the escape starts, counted from 1
    assert "\\ud800" in result.errors[0].message and f"column {column}" in result.errors[0].message
    assert [ex.messages[0].content for ex in result.examples] == ["smile \U0001f600", "a\\ud800"]
