"""End to end with training: the official openai client against a live server on loopback.

files.create -> fine_tuning.jobs.create -> poll retrieve/list_events -> succeeded -> chat with
the fine-tuned model; cancel of a running job; kill -9 of a worker process and resume.
The tiny random model trains a few steps in a child process (`python -m tunesmith train`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs_helpers import jobs_server, wait_for, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

pytest.importorskip("tunesmith.train.run", reason="the training stage (tunesmith train) is not installed")

HP = {"n_epochs": 2, "batch_size": 4}


def _serve_app_factory(model_dir):
    """serve's create_app with the jobs router, on a LocalEngine of the tiny model."""
    from tunesmith.serve.app import create_app
    from tunesmith.generate.engine import LocalEngine

    engine = LocalEngine.load(str(model_dir))
    return engine, lambda service: create_app(engine, routers=[service.router])


def _status(live, job_id):
    return live.client.fine_tuning.jobs.retrieve(job_id)


def test_upload_train_poll_and_chat_with_the_fine_tuned_model(jobs_server, tmp_path, tiny_model_dir):
    engine, factory = _serve_app_factory(tiny_model_dir)
    live = jobs_server(workers=1, engine=engine, app_factory=factory)
    client = live.client
    train = client.files.create(file=open(write_chat_jsonl(tmp_path / "train.jsonl", n=12), "rb"), purpose="fine-tune")
    valid = client.files.create(file=open(write_chat_jsonl(tmp_path / "valid.jsonl", n=3), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, validation_file=valid.id,
                                         suffix="demo", seed=7, method={"type": "supervised",
                                                                        "supervised": {"hyperparameters": HP}})
    seen_statuses = set()

    def done():
        j = _status(live, job.id)
        seen_statuses.add(j.status)
        return j if j.status in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 240, "the job to finish")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_model_dir.name}:demo:{job.id.split('-', 1)[1]}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.error is None and job.estimated_finish is None

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events][::-1]  # oldest first
    assert messages[0].startswith("Created fine-tuning job")
    assert any(m.startswith("Files validated: 12 training examples") for m in messages)
    assert "Fine-tuning job started" in messages
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["train_loss"] is not None for e in metrics)
    assert any(e.data["valid_loss"] is not None and "validation loss=" in e.message for e in metrics)
    assert max(e.data["step"] for e in metrics) == 6
    assert messages[-1] == "The job has successfully completed"

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in ckpts) == [3, 6]
    assert all(c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}" for c in ckpts)
    assert all(c.metrics.train_loss is not None and c.metrics.valid_loss is not None for c in ckpts)
    assert all(c.metrics.valid_mean_token_accuracy == c.metrics.full_valid_mean_token_accuracy for c in ckpts)

    csv_text = client.files.content(job.result_files[0]).text
    header, *rows = csv_text.strip().splitlines()
    assert header.startswith("step,epoch,train_loss") and len(rows) == 6

    lineage = client.fine_tuning.jobs.retrieve(job.id).model_extra["lineage"]
    assert lineage["files"][train.id] and lineage["base_model"]["sha256"]

    summary = [m for m in messages if m.startswith("Evaluation: tuned ")]
    assert summary and "on 3 validation examples" in summary[0], messages
    evaluation = json.loads(client.files.content(job.result_files[1]).text)
    assert evaluation["n_examples"] == 3 and set(evaluation) >= {"base", "tuned", "main_metric"}
    assert lineage["evaluation"]["main_metric"] == evaluation["main_metric"]

    wait_for(lambda: job.fine_tuned_model in [m.id for m in client.models.list()], 30, "the model to be served")
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content is not None


def test_pause_resume_then_cancel_a_running_job(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=1)
    jobs = live.client.fine_tuning.jobs
    fid = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"), purpose="fine-tune").id
    job = jobs.create(model=str(tiny_model_dir), training_file=fid, hyperparameters={"n_epochs": 20, "batch_size": 4})

    def events():
        return [e.message for e in jobs.list_events(job.id, limit=200)]

    wait_for(lambda: jobs.checkpoints.list(job.id).data, 180, "a first checkpoint")
    assert jobs.pause(job.id).status == "paused"
    wait_for(lambda: any(m.startswith("Training paused; checkpoint step") for m in events()), 60, "the trainer to pause")
    paused_at = max(c.step_number for c in jobs.checkpoints.list(job.id).data)
    assert jobs.retrieve(job.id).status == "paused"

    assert jobs.resume(job.id).status == "queued"
    wait_for(lambda: "Resuming from the last checkpoint" in events(), 60, "the job to resume")
    wait_for(lambda: max(c.step_number for c in jobs.checkpoints.list(job.id).data) > paused_at, 180,
             "a checkpoint after the resume")
    assert jobs.retrieve(job.id).status == "running"

    t0 = time.monotonic()
    assert jobs.cancel(job.id).status == "cancelled"
    wait_for(lambda: any(m.startswith("Training stopped; checkpoint step") for m in events()), 60, "the trainer to stop")
    assert time.monotonic() - t0 < 30
    assert jobs.retrieve(job.id).status == "cancelled"
    run_ckpts = list((live.home / "jobs" / job.id / "run" / "checkpoints").glob("step-*"))
    assert run_ckpts and all((p / "adapter_model.safetensors").is_file() for p in run_ckpts)
    steps = [e.data["step"] for e in jobs.list_events(job.id, limit=200) if e.type == "metrics"]
    assert len(steps) == len(set(steps)) and max(steps) < 60  # stopped early, each step reported once


def _start_worker(home, db_url, lease_s):
    env = {**os.environ, "TUNESMITH_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--db", db_url, "--poll-interval-s", "0.3",
                             "--lease-s", str(lease_s)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_of_the_worker_and_another_worker_resumes(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0, lease_s=3)  # API-only node; workers run as separate processes
    client = live.client
    db_url = f"sqlite:///{live.home / 'tunesmith.db'}"
    data = write_chat_jsonl(tmp_path / "t.jsonl", n=12)
    fid = client.files.create(file=open(data, "rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=fid, seed=3,
                                         hyperparameters={"n_epochs": 4, "batch_size": 4})
    first = _start_worker(live.home, db_url, lease_s=3)
    try:
        # Kill early, with most steps left: the trainer gets SIGTERM from the kernel (the worker
        # is its parent) and writes a checkpoint at the step it reached.
        wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=100)),
                 180, "the first training step")
        first.send_signal(signal.SIGKILL)
        first.wait()
        # No worker is left: once the lease lapses the job is queued again, not left "running".
        wait_for(lambda: _status(live, job.id).status == "queued", 30, "the orphaned job to be queued again")
        second = _start_worker(live.home, db_url, lease_s=3)
        try:
            done = wait_for(lambda: (j := _status(live, job.id)).status in ("succeeded", "failed") and j, 240,
                            "the job to finish on the second worker")
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert any("stopped sending heartbeats" in m for m in messages)
    assert "Resuming from the last checkpoint" in messages
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=200) if e.type == "metrics"]
    assert max(steps) == 12 and len(steps) == len(set(steps))  # every step reported once

    # The interrupted job ends with the model an uninterrupted run of the same settings makes.
    from safetensors.torch import load_file

    ref_out = tmp_path / "uninterrupted"
    subprocess.run([sys.executable, "-m", "tunesmith", "train", "--model", str(tiny_model_dir), "--data", str(data),
                    "--out", str(ref_out), "--seed", "3", "--epochs", "4", "--batch-size", "4"],
                   check=True, capture_output=True)
    resumed = load_file(live.home / "jobs" / job.id / "run" / "adapter" / "adapter_model.safetensors")
    reference = load_file(ref_out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert (resumed[name] - tensor).abs().max().item() <= 1e-4 * (1 + tensor.abs().max().item()), name


def test_a_disk_that_fills_during_a_checkpoint_fails_the_job_cleanly(jobs_server, tmp_path, tiny_model_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the jobs folder (a disk that can fill)")
    live = jobs_server(workers=1)
    jobs_dir = live.home / "jobs"
    jobs_dir.mkdir()
    # Room for the first checkpoint of the tiny model (~0.6 MB with the job's copy), not a second.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(jobs_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        fid = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"),
                                       purpose="fine-tune").id
        job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=fid,
                                                  hyperparameters={"n_epochs": 3, "batch_size": 4})
        done = wait_for(lambda: (j := _status(live, job.id)).status in ("succeeded", "failed") and j, 180,
                        "the job to end")
        assert done.status == "failed" and done.error.code == "training_failed"
        assert "space" in done.error.message.lower() or "disk" in done.error.message.lower(), done.error.message
        first = jobs_dir / job.id / "run" / "checkpoints" / "step-000003"
        from safetensors.torch import load_file

        assert load_file(first / "adapter_model.safetensors")  # the last good checkpoint is intact
        assert [c.step_number for c in live.client.fine_tuning.jobs.checkpoints.list(job.id)] == [3]
    finally:
        live.service.stop()  # nothing may hold files on the tmpfs when it is unmounted
        subprocess.run(["umount", "-l", str(jobs_dir)], capture_output=True)
