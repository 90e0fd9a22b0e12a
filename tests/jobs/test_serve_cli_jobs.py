"""`tunesmith serve` as a user starts it: the jobs API and its worker come with the command,
and a restart of the server loses no file, job or event, and keeps serving the tuned model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from jobs_helpers import wait_for, write_chat_jsonl

TUNESMITH = [str(Path(sys.executable).parent / "tunesmith")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(TUNESMITH + ["serve", "--port", str(port), "--threads", "1"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 120, "tunesmith serve to come up")
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    return proc.communicate(timeout=60)[0]


def test_serve_runs_jobs_and_a_restart_keeps_everything(_isolated_home, tiny_model_dir, tmp_path):
    port = _free_port()
    # The jobs name the tiny model by its folder, outside the home: the operator allows it.
    allow = ["--allow-path", str(tiny_model_dir.parent)]
    proc = _start(["--model", str(tiny_model_dir), "--api-key", "k"] + allow, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
    try:
        f = client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, suffix="cli",
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})

        def finished():
            j = client.fine_tuning.jobs.retrieve(job.id)
            return j if j.status in ("succeeded", "failed", "cancelled") else None

        job = wait_for(finished, 240, "the job to finish")
        assert job.status == "succeeded", job.error
        events_before = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        files_before = sorted(x.id for x in client.files.list().data)
        assert f.id in files_before and set(job.result_files) <= set(files_before)
    finally:
        first_output = _stop(proc)
    assert "worker" in first_output.lower(), first_output  # the default --workers 1 started one

    # The same home, an API-only node this time: nothing is lost, the tuned model is served.
    proc = _start(["--model", str(tiny_model_dir), "--api-key", "k", "--workers", "0"] + allow, port)
    try:
        assert sorted(x.id for x in client.files.list().data) == files_before
        assert client.files.content(f.id).text == (tmp_path / "t.jsonl").read_text()
        again = client.fine_tuning.jobs.retrieve(job.id)
        assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model
        assert [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)] == events_before
        assert job.fine_tuned_model in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens <= 3
    finally:
        _stop(proc)
