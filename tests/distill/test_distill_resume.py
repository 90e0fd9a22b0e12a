"""Resume: SIGKILL `tunesmith distill` half way and run it again; nothing is lost or doubled.
Also the keying (settings that change the answer ask again) and a torn last line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fake_teacher import Script, fake_teacher, wait_for_lines

from tunesmith.distill.run import distill, repair_tail

N_PROMPTS = 24


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _start(prompts: Path, url: str, out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "from tunesmith.cli import main; main()", "distill", "--prompts", str(prompts),
         "--teacher-model", "teacher", "--teacher-base-url", url, "--out", str(out), "--model", str(model),
         "--concurrency", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_sigkill_half_way_then_rerun_loses_nothing_and_doubles_nothing(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    wanted = [f"question number {i}" for i in range(N_PROMPTS)]
    prompts.write_text("\n".join(wanted) + "\n")
    out = tmp_path / "train.jsonl"
    # The first 6 prompts answer; the rest hold until the test is over, so the kill lands
    # with exactly 6 answers saved and 2 requests (--concurrency 2) in flight.
    stuck = Script(hold_first={p: threading.Event() for p in wanted[6:]})
    with fake_teacher(stuck) as url:
        proc = _start(prompts, url, out, tiny_model_dir)
        try:
            wait_for_lines(out, 6, proc)
            stuck.wait_for_requests(8)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    before = _rows(out)
    assert sorted(r["messages"][0]["content"] for r in before) == sorted(wanted[:6])  # in arrival order
    # A crash in the middle of a write leaves a torn line; add one as such a crash would.
    with open(out, "a") as fh:
        fh.write('{"messages": [{"role": "user", "content": "question number')

    fast = Script()
    with fake_teacher(fast) as url:
        proc = _start(prompts, url, out, tiny_model_dir)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "cut a torn last line" in stderr
    rows = _rows(out)  # every line parses: the torn one is gone
    asked_again = [r["prompt"] for r in fast.requests]
    answered_before = {r["messages"][0]["content"] for r in before}
    assert not answered_before & set(asked_again), "an answer from the first run was asked again"
    assert len(asked_again) == N_PROMPTS - len(before)
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(wanted)  # nothing lost, no duplicates
    assert len({r["metadata"]["distill_key"] for r in rows}) == N_PROMPTS
    assert all(r["messages"][1]["content"] == f"answer to: {r['messages'][0]['content']}" for r in rows)
    assert f"{len(before)} from earlier runs" in stdout

    # A third run has nothing left to ask.
    idle = Script()
    with fake_teacher(idle) as url:
        result = distill(prompts, "teacher", out, teacher_base_url=url, model=tiny_model_dir,
                         concurrency=2, progress=False, log=lambda m: None)
    assert idle.requests == [] and result.already == N_PROMPTS and len(_rows(out)) == N_PROMPTS


def test_key_covers_settings_and_system_and_n(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha\nbeta\nalpha\n")  # a repeated prompt is asked once
    out = tmp_path / "train.jsonl"
    script = Script()
    quiet = {"model": tiny_model_dir, "progress": False, "log": lambda m: None, "validate": False}
    with fake_teacher(script) as url:
        first = distill(prompts, "teacher", out, teacher_base_url=url, **quiet)
        assert first.written == 2 and first.duplicates == 1 and len(script.requests) == 2
        distill(prompts, "teacher", out, teacher_base_url=url, **quiet)
        assert len(script.requests) == 2  # same settings: nothing asked
        distill(prompts, "teacher", out, teacher_base_url=url, temperature=0.5, **quiet)
        assert len(script.requests) == 4  # another temperature is another answer
        distill(prompts, "teacher", out, teacher_base_url=url, system="Be brief.", **quiet)
        assert len(script.requests) == 6
        assert script.requests[-1]["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
        distill(prompts, "other-teacher", out, teacher_base_url=url, max_tokens=5, **quiet)
        assert len(script.requests) == 8 and script.requests[-1]["body"]["max_tokens"] == 5
        # --n 3 at the first settings: index 0 is there already, so 2 more per prompt in one request each
        third = distill(prompts, "teacher", out, teacher_base_url=url, n=3, **quiet)
        assert len(script.requests) == 10 and {r["body"]["n"] for r in script.requests[-2:]} == {2}
        assert third.already == 2 and third.written == 4
    rows = _rows(out)
    assert len(rows) == 2 + 2 + 2 + 2 + 4
    with_system = [r for r in rows if r["messages"][0]["role"] == "system"]
    assert len(with_system) == 2 and with_system[0]["messages"][2]["role"] == "assistant"
    assert sorted(r["metadata"]["n_index"] for r in rows if r["metadata"]["teacher_model"] == "teacher"
                  and r["messages"][0]["role"] == "user")[-4:] == [1, 1, 2, 2]


def test_repair_tail_cuts_only_a_torn_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n')
    assert repair_tail(path) == 0 and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\n{"b": 2')
    assert repair_tail(path) == len('{"b": 2') and path.read_text() == '{"a": 1}\n'
    path.write_text('{"a": 1}\n{"b": \n')  # torn, then a newline from a later write
    assert repair_tail(path) > 0 and path.read_text() == '{"a": 1}\n'
    path.write_text('{"a"')
    assert repair_tail(path) == 4 and path.read_text() == ""
    path.write_text('{"a": 1}\n{"b": 2}')  # whole, only the newline missing: kept
    assert repair_tail(path) == 0 and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\n\n')
    assert repair_tail(path) == 0 and path.read_text() == '{"a": 1}\n\n'
