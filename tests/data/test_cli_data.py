"""The `tunesmith validate` / `inspect` commands: exit codes, --json shape, output.

One test of each runs the real executable (`cli`); the others call the same command line in
this process (`cli_here`), without a child's seconds of importing torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from in_process import run_tunesmith

REPO = Path(__file__).resolve().parents[2]
TUNESMITH = str(Path(sys.executable).parent / "tunesmith")


@pytest.fixture(scope="module")
def speed_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """One measurement of the tiny model, shared by the CLI tests (each has its own home)."""
    from tunesmith.models.registry import resolve_model
    from tunesmith.train.speed import measure_train_tokens_per_s

    home = tmp_path_factory.mktemp("speed-home")
    measure_train_tokens_per_s(resolve_model(str(tiny_model_dir)), home=home)
    return home / "speed.json"


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["TUNESMITH_HOME"] = str(home)
    return subprocess.run([TUNESMITH, *args], capture_output=True, text=True, env=env, timeout=300)


def cli_here(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    return run_tunesmith(*args, env={"TUNESMITH_HOME": str(home)} if home is not None else None)


@pytest.fixture
def home(_isolated_home, speed_cache) -> Path:
    shutil.copy(speed_cache, _isolated_home / "speed.json")
    return _isolated_home


def write(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(n)]


def test_validate_json_valid_file(tmp_path, tiny_model_dir, home):
    path = write(tmp_path / "d.jsonl", rows(12))
    proc = cli("validate", str(path), "--model", str(tiny_model_dir), "--json", "--price-per-million", "2", home=home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert list(out) == ["ok", "format", "examples", "errors", "warnings", "stats", "estimate"]
    assert out["ok"] is True and out["format"] == "prompt_completion" and out["examples"] == 12
    assert out["errors"] == [] and out["warnings"] == []
    assert set(out["stats"]["tokens_per_example"]) == {"min", "p50", "p95", "max"}
    assert out["estimate"]["epochs"] == 9 and out["estimate"]["hosted_cost"] is not None


def test_validate_json_invalid_file_exits_1(tmp_path, tiny_model_dir, home):
    path = write(tmp_path / "d.jsonl", rows(11) + ["{oops", {"prompt": "q", "completion": "a", "extra": 1}])
    proc = cli_here("validate", str(path), "--model", str(tiny_model_dir), "--json", home=home)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert [(e["line"], e["field"], e["code"]) for e in out["errors"]] == [(12, "", "invalid_json"), (13, "extra", "unknown_key")]
    assert all(set(e) == {"line", "field", "code", "message"} for e in out["errors"])


def test_validate_report_groups_by_code(tmp_path, tiny_model_dir, home):
    path = write(tmp_path / "d.jsonl", rows(12) + ["not json"] * 25)
    proc = cli_here("validate", str(path), "--model", str(tiny_model_dir), home=home)
    assert proc.returncode == 1
    assert "error invalid_json (25)" in proc.stdout
    assert proc.stdout.count("not valid JSON") == 20 and "... and 5 more" in proc.stdout
    assert "line 13:" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_validate_reports_a_lone_surrogate_at_its_line_without_a_traceback(tmp_path, tiny_model_dir, home):
    """Issue 19: the tokenizer raised a TypeError on "\\ud800" (which json.loads takes)."""
    lone = '{"prompt": "caf\\ud800", "completion": "a"}'
    path = write(tmp_path / "d.jsonl", rows(12) + [lone])
    proc = cli_here("validate", str(path), "--model", str(tiny_model_dir), home=home)
    assert proc.returncode == 1, proc.stderr
    assert "error invalid_json (1)" in proc.stdout and "line 13:" in proc.stdout and "\\ud800" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_validate_warnings_still_exit_0(tmp_path, tiny_model_dir, home):
    path = write(tmp_path / "d.jsonl", rows(12) + [rows(1)[0]])
    proc = cli_here("validate", str(path), "--model", str(tiny_model_dir), home=home)
    assert proc.returncode == 0
    assert "warning duplicate_example (1)" in proc.stdout and "line 13" in proc.stdout
    assert "estimate:" in proc.stdout and "tokens/s measured here" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["validate", "missing.jsonl"], "does not exist"),
    (["validate", "{csv}"], "--input-column and --output-column"),
    (["validate", "{csv}", "--input-column", "text", "--output-column", "label"], "'label' not found"),
    (["validate", "{jsonl}", "--format", "parquet"], "unknown --format"),
    (["validate", "{jsonl}", "--model", "no-such-model"], "not found"),
    (["validate", "{jsonl}", "--max-seq-len", "0"], "--max-seq-len"),
    (["inspect", "missing.jsonl"], "does not exist"),
])
def test_usage_errors_exit_2_with_one_sentence(tmp_path, tiny_model_dir, home, args, message):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,category\nhi,greet\n")
    jsonl = write(tmp_path / "d.jsonl", rows(10))
    args = [a.format(csv=csv_path, jsonl=jsonl) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    proc = cli_here(*args, home=home)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stdout == ""


def test_validate_csv_with_system_and_validation_file(tmp_path, tiny_model_dir, home):
    train = tmp_path / "train.csv"
    train.write_text("text,category\n" + "".join(f"query {i},intent_{i % 2}\n" for i in range(12)))
    valid = tmp_path / "valid.csv"
    valid.write_text("text,category\nquery 3,intent_1\nsomething new,intent_0\n")
    proc = cli_here("validate", str(train), "--model", str(tiny_model_dir), "--input-column", "text",
               "--output-column", "category", "--system", "Route the query.", "--validation", str(valid), "--json", home=home)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["format"] == "csv" and out["examples"] == 12
    assert [(w["line"], w["code"]) for w in out["warnings"]] == [(5, "validation_overlap")]
    assert out["stats"]["labels"] == {"intent_0": 6, "intent_1": 6}


def test_inspect_plain_markers_when_not_a_tty(tiny_model_dir, home):
    proc = cli("inspect", str(REPO / "examples" / "chat.jsonl"), "--model", str(tiny_model_dir), "-n", "2", home=home)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("--- line ") == 2 and "--- line 1:" in out and "--- line 2:" in out
    # The weight-0 greeting is shown but not trained; the real answer and its end token are.
    assert "Hello, how can I help you today?<|im_end|>" in out
    assert "[[Hello, how can I help you today?" not in out
    assert "[[Open Settings > Security and tap 'Reset password'; we email you a link that works for 30 minutes.<|im_end|>]]" in out
    assert "[[<|im_start|>" not in out  # headers are never trained
    table_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["system"], ["user"], ["assistant"])]
    trained_by_role = {r[0]: int(r[2]) for r in table_rows if len(r) == 4}
    assert trained_by_role["system"] == 0 and trained_by_role["user"] == 0 and trained_by_role["assistant"] > 0


def test_inspect_csv_and_truncation(tmp_path, tiny_model_dir, home):
    proc = cli_here("inspect", str(REPO / "data" / "banking77" / "train.csv"), "--model", str(tiny_model_dir),
               "--input-column", "text", "--output-column", "category", "-n", "1", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "I am still waiting on my card?" in proc.stdout and "[[card_arrival<|im_end|>]]" in proc.stdout
    proc = cli_here("inspect", str(REPO / "examples" / "chat.jsonl"), "--model", str(tiny_model_dir), "-n", "1",
               "--max-seq-len", "20", home=home)
    assert "truncated from" in proc.stdout and "[[" not in proc.stdout.split("(trained tokens")[0]


def test_inspect_preference_shows_both_answers(tiny_model_dir, home):
    proc = cli_here("inspect", str(REPO / "examples" / "dpo.jsonl"), "--model", str(tiny_model_dir), "-n", "1", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "--- line 1 (chosen)" in proc.stdout and "--- line 1 (rejected)" in proc.stdout
    assert "[[Call us.<|im_end|>]]" in proc.stdout


def test_inspect_preference_prompt_turns_are_not_trained(tiny_model_dir, home, tmp_path):
    """An assistant turn inside a pair's prompt is shared context: shown untrained, as DPO treats it."""
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "earlier"},
                                           {"role": "user", "content": "second"}], "chosen": "yes", "rejected": "no"}) + "\n")
    proc = cli_here("inspect", str(path), "--model", str(tiny_model_dir), home=home)
    assert proc.returncode == 0, proc.stderr
    assert "[[yes<|im_end|>]]" in proc.stdout and "[[no<|im_end|>]]" in proc.stdout
    assert "earlier" in proc.stdout and "[[earlier" not in proc.stdout


def test_inspect_styles_on_a_terminal(tiny_model_dir):
    """On a terminal, trained text is styled bold green and masked text dim, without markers."""
    from rich.console import Console

    from tunesmith.data.inspection import inspect_data, print_inspection

    items, problems = inspect_data(REPO / "examples" / "prompt_completion.jsonl", model=str(tiny_model_dir), n=1)
    console = Console(record=True, force_terminal=True, color_system="truecolor", width=200)
    print_inspection(items, problems, console, plain=False)
    spans = {(seg.text, str(seg.style)) for seg in console._record_buffer if seg.text.strip()}
    assert any("<|im_end|>" in text and "bold" in style and "green" in style for text, style in spans)
    assert any("How do I reset my password?" in text and "dim" in style for text, style in spans)
    assert "[[" not in console.export_text()


def test_inspect_shows_a_tool_call_trained_as_serve_writes_it(tmp_path, tiny_model_dir, home):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    line = {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(line) + "\n")
    proc = cli_here("inspect", str(data), "--model", str(tiny_model_dir), "-n", "1", home=home)
    assert proc.returncode == 0, proc.stderr
    assert '[[<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>]]' in proc.stdout
    assert '"name": "weather", "parameters"' in proc.stdout  # the tools, listed in the system turn, not trained
