"""Retries, failures and the API key, against a real local HTTP server that fails on purpose
(the official openai client talks to it over loopback; nothing is mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from fake_teacher import Script, fake_teacher
from in_process import run_tunesmith

from tunesmith.distill.run import distill, sidecar


def _prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


FILLER = [f"filler prompt {i}" for i in range(10)]  # the validator wants at least 10 examples


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-c", "from tunesmith.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def run_here(*args) -> subprocess.CompletedProcess:
    """The same command line in this process (tests/in_process.py): the tests that check no
    key reaches the output keep the real child process, which shows every library's output too."""
    return run_tunesmith(*args, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": None})


def test_429_twice_then_success_is_retried(tmp_path, tiny_model_dir):
    script = Script(fail_first={"second": [429, 429], "third": [503]})
    prompts = _prompts(tmp_path / "prompts.txt", ["first", "second", "third"] + FILLER)
    out = tmp_path / "train.jsonl"
    with fake_teacher(script) as url:
        result = distill(prompts, "teacher", out, teacher_base_url=url, model=tiny_model_dir,
                         progress=False, log=lambda m: None)
    assert script.asked("second") == 3 and script.asked("third") == 2 and script.asked("first") == 1
    assert result.written == 13 and result.failed == 0 and result.retries == 3 and result.requests == 16
    rows = _rows(out)
    answers = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in rows}
    assert answers == {p: f"answer to: {p}" for p in ["first", "second", "third"] + FILLER}
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert result.report is not None and result.report.ok and result.report.examples == 13
    assert not sidecar(out, "failed").exists()


def test_prompt_that_keeps_failing_is_recorded_not_dropped(tmp_path, tiny_model_dir):
    script = Script(always={"broken": 500, "refused": 400})
    prompts = _prompts(tmp_path / "prompts.txt", ["fine", "broken", "refused", "also fine"] + FILLER)
    out = tmp_path / "train.jsonl"
    with fake_teacher(script) as url:
        proc = run_here("distill", "--prompts", prompts, "--teacher-model", "teacher", "--teacher-base-url", url,
                       "--out", out, "--model", tiny_model_dir, "--max-retries", "2",
                       "--price-per-million", "2.5")
    assert proc.returncode == 1, proc.stderr
    # 500 is retried (1 + 2 retries); 400 cannot change by asking again, so it is not.
    assert script.asked("broken") == 3 and script.asked("refused") == 1
    assert sorted(r["messages"][0]["content"] for r in _rows(out)) == sorted(["also fine", "fine"] + FILLER)
    failed = {r["messages"][-1]["content"]: r for r in _rows(sidecar(out, "failed"))}
    assert set(failed) == {"broken", "refused"}
    assert failed["broken"]["attempts"] == 3 and "HTTP 500" in failed["broken"]["error"]
    assert "gave up after 3 attempts" in failed["broken"]["error"]
    assert failed["refused"]["attempts"] == 1 and "HTTP 400" in failed["refused"]["error"]
    assert "2 answer(s) failed" in proc.stdout and "prompt line 2: HTTP 500" in proc.stdout
    assert "run the same command again" in proc.stdout
    # cost so far: tokens in and out the server reported, at $2.5 per million
    tokens = sum(len(p.split()) + 5 + len(f"answer to: {p}".split()) for p in ["fine", "also fine"] + FILLER)
    assert f"cost ${tokens * 2.5 / 1e6:,.4f}" in proc.stdout
    assert "12 usable examples, valid" in proc.stdout  # the validator's summary of the written file

    # A re-run retries only the failed prompts; now the teacher is well.
    script.always.clear()
    with fake_teacher(script) as url:
        proc = run_here("distill", "--prompts", prompts, "--teacher-model", "teacher", "--teacher-base-url", url,
                       "--out", out, "--model", tiny_model_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert script.asked("fine") == 1 and script.asked("broken") == 4 and script.asked("refused") == 2
    assert len(_rows(out)) == 14 and not sidecar(out, "failed").exists()


def test_timeout_is_retried(tmp_path, tiny_model_dir):
    # The first "slow" request never answers (until the test is over), so only the client's
    # timeout ends it. The one wall-clock margin left: the other requests, answered at once
    # over loopback, must come back within timeout_s.
    script = Script(hold_first={"slow": threading.Event()})
    prompts = _prompts(tmp_path / "prompts.txt", ["slow", "quick"])
    out = tmp_path / "train.jsonl"
    with fake_teacher(script) as url:
        result = distill(prompts, "teacher", out, teacher_base_url=url, model=tiny_model_dir, timeout_s=1.0,
                         progress=False, log=lambda m: None)
    assert script.asked("slow") == 2 and result.retries == 1 and result.written == 2


def test_api_key_is_sent_but_never_written(tmp_path, tiny_model_dir):
    key = "sk-test-7f3a9c-never-on-disk"
    # The failing prompt's error message echoes the key, as a careless server might.
    script = Script(always={"leaky": 401}, error_message=f"bad key {key}")
    prompts = _prompts(tmp_path / "prompts.txt", ["hello", "leaky", "say ok"])
    label_file = tmp_path / "labels.txt"
    label_file.write_text("yes\n")
    out = tmp_path / "train.jsonl"
    with fake_teacher(script) as url:
        proc = run_cli("distill", "--prompts", prompts, "--teacher-model", "teacher", "--teacher-base-url", url,
                       "--out", out, "--model", tiny_model_dir, "--api-key", key, "--filter", f"label:{label_file}")
    assert {r["authorization"] for r in script.requests} == {f"Bearer {key}"}
    written = [p for p in tmp_path.iterdir() if p.name.startswith("train.")]
    assert {p.name for p in written} == {"train.jsonl", "train.failed.jsonl", "train.rejected.jsonl"}
    for path in written:
        assert key not in path.read_text(), path
    assert "bad key ***" in sidecar(out, "failed").read_text()
    assert key not in proc.stdout and key not in proc.stderr


def test_bad_options_get_one_sentence(tmp_path, tiny_model_dir):
    prompts = _prompts(tmp_path / "prompts.txt", ["a"])
    proc = run_here("distill", "--prompts", prompts, "--teacher-model", "t", "--out", tmp_path / "o.jsonl",
                   "--model", tiny_model_dir, "--concurrency", "0", "--n", "0", "--filter", "regex:(")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--concurrency must be at least 1, got 0" in proc.stderr and "--n must be at least 1" in proc.stderr
    proc = run_here("distill", "--prompts", prompts, "--teacher-model", "t", "--out", tmp_path / "o.jsonl",
                   "--model", tiny_model_dir, "--filter", "regex:(")
    assert proc.returncode == 2 and "not a valid regular expression" in proc.stderr
    proc = run_here("distill", "--prompts", tmp_path / "missing.txt", "--teacher-model", "t",
                   "--out", tmp_path / "o.jsonl", "--model", tiny_model_dir)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_compare_cli_measures_the_teacher(tmp_path, tiny_model_dir):
    """`tunesmith compare --teacher-model --teacher-base-url`: the teacher is one more row,
    priced at its own rate, and the verdict names it when it wins."""
    labels = {"card": "card_arrival", "rate": "exchange_rate"}

    def write(path: Path, n: int) -> Path:
        rows = [{"messages": [{"role": "user", "content": f"my {w} question {i}"},
                              {"role": "assistant", "content": labels[w]}]}
                for i in range(n) for w in labels]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    train, test = write(tmp_path / "train.jsonl", 4), write(tmp_path / "test.jsonl", 3)
    key = "sk-compare-secret"
    script = Script(answer=lambda prompt: labels[prompt.split()[1]])  # a teacher that is always right
    out = tmp_path / "cmp"
    with fake_teacher(script) as url:
        proc = run_cli("compare", "--model", tiny_model_dir, "--train", train, "--test", test, "--shots", "1",
                       "--max-new-tokens", "3", "--out", out, "--teacher-model", "big-teacher",
                       "--teacher-base-url", url, "--teacher-api-key", key, "--teacher-price-per-million", "5",
                       "--report")
    assert proc.returncode == 0, proc.stderr
    assert len(script.requests) == 6 and {r["authorization"] for r in script.requests} == {f"Bearer {key}"}
    assert all(r["body"]["temperature"] == 0 and r["body"]["max_tokens"] == 3 for r in script.requests)
    c = json.loads((out / "compare.json").read_text())
    teacher = c["strategies"][-1]
    assert teacher["name"] == "teacher" and teacher["scores"]["accuracy"] == 1.0
    total = teacher["prompt_tokens_per_request"] + teacher["completion_tokens_per_request"]
    assert teacher["prompt_tokens_per_request"] == 4 + 5  # what the server reported: 4 words + 5
    assert teacher["cost_per_million_requests"] == 5 * total
    assert c["verdict"].startswith("teacher wins on this data: accuracy 100.0%")
    assert "teacher" in proc.stdout and c["verdict"] in " ".join(proc.stdout.split())
    assert key not in proc.stdout + proc.stderr and key not in (out / "compare.json").read_text()
    assert ">teacher<" in (out / "report.html").read_text()
