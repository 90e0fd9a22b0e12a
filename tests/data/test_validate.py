"""validate_data through the tiny model's real chat template: codes, lines, stats, estimate."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest
from rich.console import Console

from tunesmith.data.formats import ColumnMapping
from tunesmith.data.validate import ValidationReport, print_report, validate_data
from tunesmith.errors import ModelNotFoundError, UsageError

REPO = Path(__file__).resolve().parents[2]


def convo(q: str, a: str, system: str | None = None, **extra) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}
    ]
    return {"messages": msgs, **extra}


def distinct(n: int, system: str | None = None) -> list[dict]:
    return [convo(f"question number {i}", f"answer {i}", system) for i in range(n)]


def write(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def problems(report: ValidationReport, code: str) -> list[tuple[int, str]]:
    return [(p.line, p.field) for p in report.errors + report.warnings if p.code == code]


def run(path: Path, model: Path, **kw) -> ValidationReport:
    return validate_data(path, model=model, estimate=False, **kw)


def test_valid_file_has_stats(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", distinct(12, system="Be brief."))
    report = run(path, tiny_model_dir)
    assert report.ok and report.examples == 12 and not report.warnings
    s = report.stats
    from tunesmith.data.example import chat
    from tunesmith.data.render import render_example

    first = render_example(tiny_tokenizer, chat(("system", "Be brief."), ("user", "question number 0"), ("assistant", "answer 0")))
    assert s["tokens_per_example"]["min"] <= len(first) <= s["tokens_per_example"]["max"]
    assert s["trained_tokens_per_example"]["min"] >= 2  # the answer plus <|im_end|>
    assert s["tokens_per_epoch"] >= 12 * s["tokens_per_example"]["min"]
    assert s["labels"] is None  # 12 distinct answers are not class labels
    d = report.to_dict()
    assert set(d) == {"ok", "format", "examples", "errors", "warnings", "stats", "estimate"}


def test_too_few_examples(tmp_path, tiny_model_dir):
    report = run(write(tmp_path / "d.jsonl", distinct(9)), tiny_model_dir)
    assert problems(report, "too_few_examples") == [(0, "")]
    assert not report.ok


def test_empty_file(tmp_path, tiny_model_dir):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    report = run(path, tiny_model_dir)
    assert [p.code for p in report.errors] == ["empty_file"]


def test_errors_keep_their_lines_among_valid_rows(tmp_path, tiny_model_dir):
    rows = distinct(12)
    rows.insert(4, "{broken")
    rows.insert(8, {"messages": [{"role": "user", "content": "q"}]})
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert [(p.line, p.code) for p in report.errors] == [(5, "invalid_json"), (9, "no_assistant_message")]
    assert report.examples == 12


def test_too_long_and_assistant_truncated(tmp_path, tiny_model_dir):
    rows = distinct(11)
    rows.insert(2, convo("short question", "a long answer " * 40))
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir, max_seq_len=100)
    assert problems(report, "too_long") == [(3, "messages")]
    assert problems(report, "assistant_truncated") == [(3, "messages")]
    assert "keeps the first 100 tokens" in next(p.message for p in report.warnings if p.code == "too_long")
    assert report.ok and report.stats["truncated_examples"] == 1


def test_no_trainable_tokens_after_truncation(tmp_path, tiny_model_dir):
    rows = distinct(11)
    rows.insert(5, convo("a very long question " * 40, "yes"))
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir, max_seq_len=100)
    assert problems(report, "no_trainable_tokens") == [(6, "messages")]
    assert problems(report, "too_long") == [(6, "messages")]
    assert report.examples == 11 and not report.ok


def test_duplicate_example(tmp_path, tiny_model_dir):
    rows = distinct(11)
    rows.insert(7, rows[1])
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert problems(report, "duplicate_example") == [(8, "")]
    assert "line 2" in report.warnings[0].message


def test_missing_system_message(tmp_path, tiny_model_dir):
    rows = distinct(11, system="Route the query.")
    rows.insert(3, convo("no system here", "fine"))
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert problems(report, "missing_system_message") == [(4, "messages")]
    assert report.ok


def test_last_message_not_assistant(tmp_path, tiny_model_dir):
    rows = distinct(11)
    rows.insert(9, {"messages": convo("q", "a")["messages"] + [{"role": "user", "content": "thanks"}]})
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert problems(report, "last_message_not_assistant") == [(10, "messages[2].role")]


def test_validation_overlap(tmp_path, tiny_model_dir):
    train = write(tmp_path / "train.jsonl", distinct(12))
    valid = write(tmp_path / "valid.jsonl", [convo("other", "thing"), distinct(12)[6], "{bad"])
    report = run(train, tiny_model_dir, validation=valid)
    assert problems(report, "validation_overlap") == [(7, "")]
    assert "line 2 of the validation file valid.jsonl" in report.warnings[0].message
    assert [(p.line, p.code) for p in report.errors] == [(3, "invalid_json")]
    assert report.errors[0].message.startswith("valid.jsonl: ")


def test_pad_equal_to_end_token_is_eos_not_trained(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.pad_token = tok.eos_token  # <|im_end|>, the token that closes assistant turns
    report = run(write(tmp_path / "d.jsonl", distinct(10)), tiny_model_dir, tokenizer=tok)
    assert problems(report, "eos_not_trained") == [(0, "tokenizer.pad_token")]


def test_template_without_end_token_is_eos_not_trained(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    report = run(write(tmp_path / "d.jsonl", distinct(10)), tiny_model_dir, tokenizer=tok)
    lines = [line for line, _ in problems(report, "eos_not_trained")]
    assert lines == list(range(1, 11))


def test_template_error_is_reported_at_its_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = (
        "{% for m in messages %}{% if m['content'] == 'r' %}{{ raise_exception('no r here') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    rows = distinct(11)
    rows.insert(4, {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"},
                                 {"role": "assistant", "content": "a"}]})
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir, tokenizer=tok)
    assert problems(report, "template_error") == [(5, "messages")]
    assert "no r here" in report.errors[0].message
    assert report.examples == 11


def test_tools_on_a_template_without_them_take_the_default_syntax(tmp_path, tiny_model_dir):
    """The tiny model's plain ChatML template has no tools: they are listed in the system
    message and calls written in Hermes' syntax (data/tool_format.py), so nothing is lost."""
    rows = distinct(11)
    tools = [{"type": "function", "function": {"name": "get_balance", "parameters": {}}}]
    rows.insert(1, convo("balance?", "You have 42.", tools=tools))
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert problems(report, "tools_not_rendered") == []
    assert report.ok


def test_label_distribution_for_classification(tmp_path, tiny_model_dir):
    rows = [convo(f"text {i}", ["card_arrival", "exchange_rate", "lost_card"][i % 3]) for i in range(30)]
    report = run(write(tmp_path / "d.jsonl", rows), tiny_model_dir)
    assert report.stats["labels"] == {"card_arrival": 10, "exchange_rate": 10, "lost_card": 10}


def test_preference_pairs_count_both_answers(tmp_path, tiny_model_dir):
    report = run(REPO / "examples" / "dpo.jsonl", tiny_model_dir)
    assert report.ok and report.format == "preference" and report.examples == 11
    # Both answers are trained sequences: at least two end tokens per pair.
    assert report.stats["trained_tokens_per_example"]["min"] >= 4


def test_preference_pairs_need_two_different_answers(tmp_path, tiny_model_dir):
    """validate on preference files: a pair without one of its answers, or with the same answer
    twice, is an error at its line (in both dialects); an assistant turn inside the prompt is
    context shared by both answers, never counted as trained."""
    good = [{"prompt": f"question {i}", "chosen": f"a good answer {i}", "rejected": f"bad {i}"} for i in range(10)]
    msgs = [{"role": "user", "content": "q"}]
    bad = [
        {"prompt": "q", "chosen": "same answer", "rejected": " same answer"},
        {"prompt": "q", "rejected": "bad"},
        {"prompt": "q", "chosen": "good", "rejected": "  "},
        {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": "x"}],
         "non_preferred_output": [{"role": "assistant", "content": "x"}]},
        {"input": {"messages": msgs}, "non_preferred_output": [{"role": "assistant", "content": "x"}]},
    ]
    report = run(write(tmp_path / "p.jsonl", good + bad), tiny_model_dir)
    assert report.format == "preference" and report.examples == 10 and not report.ok
    assert [(p.line, p.field, p.code) for p in report.errors] == [
        (11, "rejected", "identical_answers"), (12, "chosen", "missing_content"), (13, "rejected", "empty_content"),
        (14, "non_preferred_output", "identical_answers"), (15, "preferred_output", "missing_content")]

    with_history = [{"prompt": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "earlier " * 20},
                                {"role": "user", "content": f"second {i}"}],
                     "chosen": "yes", "rejected": "no"} for i in range(10)]
    plain = [{**r, "prompt": r["prompt"][2:]} for r in with_history]
    a = run(write(tmp_path / "history.jsonl", with_history), tiny_model_dir).stats
    b = run(write(tmp_path / "plain.jsonl", plain), tiny_model_dir).stats
    assert a["tokens_per_epoch"] > b["tokens_per_epoch"]
    assert a["trained_tokens_per_epoch"] == b["trained_tokens_per_epoch"]


def test_csv_needs_the_column_mapping(tmp_path, tiny_model_dir):
    path = tmp_path / "d.csv"
    path.write_text("text,category\nhello,greet\n")
    with pytest.raises(UsageError, match="--input-column and --output-column"):
        run(path, tiny_model_dir)


def test_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        validate_data(REPO / "examples" / "chat.jsonl", model=str(tmp_path / "nope"))


def test_bundled_banking77_with_the_tiny_model(tiny_model_dir):
    report = run(REPO / "data" / "banking77" / "train.csv", tiny_model_dir,
                 columns=ColumnMapping("text", "category"))
    assert report.ok and report.examples == 3075
    assert len(report.stats["labels"]) == 77 and report.stats["labels"]["card_arrival"] == 40


def _peak_validating(path: Path, model: Path) -> tuple[int, ValidationReport]:
    tracemalloc.start()
    report = run(path, model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, report


def test_validate_memory_does_not_grow_with_the_file(tmp_path, tiny_model_dir):
    """Four times the data, about the same peak: validate holds a chunk, not the file."""
    answer = "The quick brown fox jumps over the lazy dog. " * 11  # ~500 characters
    peaks = []
    for n in (1_000, 4_000):
        path = write(tmp_path / f"d{n}.jsonl", [convo(f"question {i}", answer) for i in range(n)])
        peak, report = _peak_validating(path, tiny_model_dir)
        assert report.ok and report.examples == n
        peaks.append(peak)
    small, big = peaks
    assert big < 1.3 * small + 300_000, f"peak {small} bytes for 1,000 lines but {big} for 4,000"


def test_estimate_without_a_measurement_says_so_and_never_trains(tmp_path, tiny_model_dir, _isolated_home):
    """What the server's validation route gets: the cache only, no training steps."""
    path = write(tmp_path / "d.jsonl", distinct(20))
    report = validate_data(path, model=tiny_model_dir, price_per_million=3.0)
    e = report.estimate
    assert e["epochs"] == 5 and e["train_tokens_per_s"] is None and e["time_s"] is None
    assert e["hosted_cost"] == round(e["tokens_total"] * 3.0 / 1e6, 2)
    assert not (_isolated_home / "speed.json").exists()
    out = io.StringIO()
    print_report(report, Console(file=out, width=200))
    assert "no training speed measured on this machine yet" in out.getvalue()


def test_estimate_is_measured_and_cached(tmp_path, tiny_model_dir, _isolated_home):
    from tunesmith.train.speed import measure_train_tokens_per_s

    path = write(tmp_path / "d.jsonl", distinct(20))
    report = validate_data(path, model=tiny_model_dir, price_per_million=3.0, measure_speed=measure_train_tokens_per_s)
    e = report.estimate
    assert e["epochs"] == 5  # auto: 20 examples x 5 epochs reach the 100-example floor
    assert e["tokens_total"] == 5 * report.stats["tokens_per_epoch"]
    assert e["trained_tokens_total"] == 5 * report.stats["trained_tokens_per_epoch"]
    assert e["train_tokens_per_s"] > 0 and e["time_s"] > 0
    assert e["hosted_cost"] == round(e["tokens_total"] * 3.0 / 1e6, 2)
    cache = json.loads((_isolated_home / "speed.json").read_text())
    assert len(cache) == 1
    (entry,) = cache.values()
    assert entry["tokens_per_s"] == pytest.approx(e["train_tokens_per_s"], abs=0.05)
