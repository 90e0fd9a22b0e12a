"""--filter (json, label file, regex) counting what it drops, and the prompt formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_teacher import Script, fake_teacher

from tunesmith.distill.filters import build_filter
from tunesmith.distill.prompts import load_prompts
from tunesmith.distill.run import distill, sidecar
from tunesmith.errors import DataError, UsageError

ANSWERS = ['{"intent": "refund"}', "[1, 2]", "positive", "negative", "maybe", "42", "not json {", "positive "]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("spec, kept", [
    ("json", ['{"intent": "refund"}', "[1, 2]", "42"]),
    ("label:LABELS", ["positive", "negative", "positive "]),
    ("regex:[0-9]+|pos.*", ["positive", "42", "positive "]),
])
def test_filter_keeps_wanted_shape_and_counts_drops(tmp_path, spec, kept):
    labels = tmp_path / "labels.txt"
    labels.write_text("positive\nnegative\n\n")
    spec = spec.replace("LABELS", str(labels))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"say {a}\n" for a in ANSWERS))
    out = tmp_path / "train.jsonl"
    script = Script()
    with fake_teacher(script) as url:
        result = distill(prompts, "teacher", out, teacher_base_url=url, filter=spec, validate=False,
                         progress=False, log=lambda m: None)
        assert sorted(r["messages"][-1]["content"] for r in _rows(out)) == sorted(kept)
        assert result.written == len(kept) and result.dropped == len(ANSWERS) - len(kept)
        rejected = _rows(sidecar(out, "rejected"))
        assert sorted(r["answer"] for r in rejected) == sorted(set(ANSWERS) - set(kept))
        assert all(r["filter"] == spec for r in rejected)
        # A dropped answer was paid for: resuming does not ask for it again.
        again = distill(prompts, "teacher", out, teacher_base_url=url, filter=spec, validate=False,
                        progress=False, log=lambda m: None)
    assert len(script.requests) == len(ANSWERS) and again.already == len(ANSWERS) and again.written == 0


def test_bad_filter_specs():
    for spec, words in (("xml", "not understood"), ("label:/nonexistent/labels.txt", "does not exist"),
                        ("regex:[a-", "not a valid regular expression"), ("label:", "not understood")):
        with pytest.raises(UsageError, match=words):
            build_filter(spec)
    assert build_filter(None) is None


def test_prompt_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first question\n\nsecond question\r\n")
    assert [(p.messages[0].content, p.line) for p in load_prompts(text)] == [("first question", 1), ("second question", 3)]

    chat = tmp_path / "p.jsonl"
    chat.write_text("\n".join(json.dumps(o) for o in [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "ignored answer"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"prompt": "plain prompt", "completion": "ignored"},
        {"instruction": "Translate", "input": "hola"},
    ]) + "\n")
    loaded = load_prompts(chat)
    assert [[(m.role, m.content) for m in p.messages] for p in loaded] == [
        [("system", "S"), ("user", "q1")],
        [("user", "a"), ("assistant", "b"), ("user", "c")],  # earlier turns stay as context
        [("user", "plain prompt")],
        [("user", "Translate\n\nhola")],
    ]
    replaced = load_prompts(chat, system="New system")
    assert all(p.messages[0].content == "New system" for p in replaced)
    assert all(sum(m.role == "system" for m in p.messages) == 1 for p in replaced)

    table = tmp_path / "p.csv"
    table.write_text("id,question,label\n1,where is my card,card_arrival\n2,\"rate, today?\",exchange_rate\n")
    assert [p.messages[-1].content for p in load_prompts(table, input_column="question")] == [
        "where is my card", "rate, today?"]
    with pytest.raises(UsageError, match="'text' not found"):
        load_prompts(table)


def test_bad_prompt_files_list_every_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "only an answer"}]}\n{"nope": 1}\n{oops\n')
    with pytest.raises(DataError) as info:
        load_prompts(bad)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "line 1: the conversation has no user message" in msg
    assert "line 2: the object has no 'messages', 'prompt' or 'instruction'" in msg and "line 3: not valid JSON" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompts(empty)
