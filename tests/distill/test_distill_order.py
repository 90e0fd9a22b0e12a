"""The output is in prompt order, whatever order the teacher's answers arrive in: a real
loopback teacher that answers early prompts last, at a concurrency that lets it; a resume
that adds answers to every prompt; a Ctrl-C in the middle of a run; and a rewrite that
dies half way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_teacher import Script, fake_teacher, wait_for_lines

from tunesmith.distill.run import distill, sidecar

N_PROMPTS = 16


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _order(rows: list[dict]) -> list[tuple[int, int]]:
    """(prompt_line, n_index) of output lines (in metadata) or rejected lines (at the top)."""
    return [(m["prompt_line"], m["n_index"]) for m in (r.get("metadata", r) for r in rows)]


def _reverse_teacher(prompts: list[str]) -> Script:
    """The teacher answers a prompt's first request only once it has answered the next
    prompt's, so answers go out last prompt first (all requests must be in flight at once)."""
    script = Script()
    for earlier, later in zip(prompts, prompts[1:]):
        script.hold_first[earlier] = script.replied(later)
    return script


def test_answers_arriving_in_reverse_are_written_in_prompt_order(tmp_path, tiny_model_dir):
    # Every 4th prompt answers "drop ...", which the filter rejects: 12 kept, 4 rejected.
    wanted = [f"say {'drop' if i % 4 == 3 else 'keep'} {i}" for i in range(N_PROMPTS)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in wanted))
    out = tmp_path / "train.jsonl"
    quiet = {"model": tiny_model_dir, "progress": False, "log": lambda m: None, "filter": "regex:keep.*"}

    script = _reverse_teacher(wanted)
    with fake_teacher(script) as url:
        result = distill(prompts, "teacher", out, teacher_base_url=url, concurrency=N_PROMPTS, **quiet)
    assert result.written == 12 and result.dropped == 4 and len(script.requests) == N_PROMPTS
    rows = _rows(out)
    assert _order(rows) == [(i + 1, 0) for i in range(N_PROMPTS) if i % 4 != 3]
    assert [r["messages"][-1]["content"] for r in rows] == [p[4:] for p in wanted if "keep" in p]
    assert _order(_rows(sidecar(out, "rejected"))) == [(i + 1, 0) for i in range(N_PROMPTS) if i % 4 == 3]
    assert result.report is not None and result.report.ok and result.report.examples == 12  # validated as sorted
    first_run = {r["metadata"]["distill_key"]: r for r in rows}

    # A resume with --n 2 asks each prompt for its answer 1 only; the file then holds both answers
    # of every prompt side by side, the first run's lines unchanged.
    script = _reverse_teacher(wanted)
    with fake_teacher(script) as url:
        again = distill(prompts, "teacher", out, teacher_base_url=url, concurrency=N_PROMPTS, n=2, **quiet)
    assert again.already == N_PROMPTS and len(script.requests) == N_PROMPTS
    assert {r["body"]["n"] for r in script.requests} == {1}
    rows = _rows(out)
    kept_lines = [i + 1 for i in range(N_PROMPTS) if i % 4 != 3]
    assert _order(rows) == [(line, k) for line in kept_lines for k in (0, 1)]
    assert [r for r in rows if r["metadata"]["distill_key"] in first_run] == list(first_run.values())
    assert _order(_rows(sidecar(out, "rejected"))) == [
        (i + 1, k) for i in range(N_PROMPTS) if i % 4 == 3 for k in (0, 1)]
    # The validator read the sorted file: each answer 1 repeats the answer 0 on the line above it.
    duplicates = [(w.line, w.message) for w in again.report.warnings if w.code == "duplicate_example"]
    assert duplicates == [(2 * j + 2, f"the same example as line {2 * j + 1}; duplicates weigh that example "
                                      "double in training") for j in range(12)]


def test_sort_keeps_unkeyed_lines_at_the_end_and_leaves_an_ordered_file_alone(tmp_path):
    from tunesmith.distill.order import sort_by_prompt

    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "train.jsonl"

    def line(prompt_line: int, n_index: int, tag: str) -> str:
        return json.dumps({"messages": [], "metadata": {"prompt_line": prompt_line, "n_index": n_index,
                                                        "tag": tag}}) + "\n"

    unkeyed = '{"messages": [], "note": "written by hand"}\n'
    path.write_text(line(3, 0, "a") + unkeyed + "\n" + line(1, 1, "b") + line(1, 0, "c") + line(3, 0, "d")
                    + '{"messages": [{"role": "us')  # a torn last line, as a crash mid-write leaves it
    assert sort_by_prompt(path)
    assert path.read_text() == (line(1, 0, "c") + line(1, 1, "b") + line(3, 0, "a") + line(3, 0, "d")
                                + unkeyed + "\n" + '{"messages": [{"role": "us')
    assert [p.name for p in folder.iterdir()] == ["train.jsonl"]  # no temporary file left behind

    path.write_text(line(1, 0, "x") + line(2, 0, "y"))
    os.utime(path, (0, 0))
    assert not sort_by_prompt(path) and path.stat().st_mtime == 0  # already in order: not rewritten
    assert not sort_by_prompt(folder / "missing.jsonl")


# The child dumps every thread's stack on SIGUSR1, for the message of a test that times out.
CHILD = ("import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from tunesmith.cli import main; main()")


def test_ctrl_c_leaves_the_answers_so_far_in_prompt_order(tmp_path, tiny_model_dir):
    """Prompts 1-6 stall until the test is over; 7-12 are let through one at a time, 12
    first, each once the previous answer is in the file. SIGINT once those six are saved."""
    wanted = [f"question number {i}" for i in range(12)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in wanted))
    out = tmp_path / "train.jsonl"
    script = Script(hold_first={p: threading.Event() for p in wanted})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with fake_teacher(script) as url:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, "distill", "--prompts", str(prompts),
             "--teacher-model", "teacher", "--teacher-base-url", url, "--out", str(out),
             "--model", str(tiny_model_dir), "--concurrency", "12"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            script.wait_for_requests(12)  # every prompt is in flight
            for written, index in enumerate(range(11, 5, -1), start=1):
                script.hold_first[wanted[index]].set()
                arrived = wait_for_lines(out, written, proc)
            # Appended as they arrived, last prompt first: the order Ctrl-C has to undo.
            assert _order([json.loads(line) for line in arrived]) == [(line, 0) for line in range(12, 6, -1)]
            proc.send_signal(signal.SIGINT)
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # say where it is stuck: every thread's stack
                proc.send_signal(signal.SIGUSR1)
                try:
                    stdout, stderr = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                pytest.fail(f"distill did not stop within 60 s of SIGINT; its output:\n{stdout}\n{stderr}")
        finally:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted: 6 answer(s) of this run are saved" in stderr
    assert _order(_rows(out)) == [(line, 0) for line in range(7, 13)]
