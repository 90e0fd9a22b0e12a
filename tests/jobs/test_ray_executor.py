"""Jobs trained as Ray Train jobs (`--executor ray`) on a real local Ray cluster: through the
official openai client against a real `tunesmith serve`, 2 Ray workers train the tiny model
to the same weights as `tunesmith train --nproc 2`; a Ray worker killed mid-run is replaced
and the run resumes from its last checkpoint, and pausing the job has the Ray workers save at
the end of their step and end (resume continues from that step, through Ray's storage). One
cluster for the module (2 CPUs)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs_helpers import jobs_server, wait_for, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

ray = pytest.importorskip("ray", reason="the Ray executor's tests need pip install 'tunesmith[ray]'")
pytest.importorskip("ray.train", reason="the Ray executor's tests need Ray Train: pip install 'tunesmith[ray]'")

TUNESMITH = [str(Path(sys.executable).parent / "tunesmith")]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, started once; its GCS address for the drivers."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ctx = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _env() -> dict[str, str]:
    # The drivers' workers import tunesmith from this checkout (Ray starts them elsewhere).
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished(client, job_id):
    def check():
        j = client.fine_tuning.jobs.retrieve(job_id)
        return j if j.status in ("succeeded", "failed", "cancelled") else None

    return check


def _weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_a_job_on_two_ray_workers_matches_nproc_2(ray_cluster, _isolated_home, tiny_model_dir, tmp_path):
    import httpx
    import openai

    port = _free_port()
    env = _env()
    # Ray's checkpoints in a folder of their own, as they would be on shared storage.
    storage = tmp_path / "ray-storage"
    serve = subprocess.Popen(TUNESMITH + ["serve", "--port", str(port), "--threads", "1", "--model", str(tiny_model_dir),
                                          "--allow-path", str(tiny_model_dir.parent), "--executor", "ray",
                                          "--ray-address", ray_cluster, "--ray-storage", str(storage)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        def up():
            assert serve.poll() is None, "tunesmith serve exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120, "tunesmith serve to come up")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        data = write_chat_jsonl(tmp_path / "t.jsonl", n=16)
        f = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=5,
                                             hyperparameters={"n_epochs": 1, "batch_size": 8, "n_workers": 2})
        job = wait_for(_finished(client, job.id), 300, "the Ray job to finish")
        run = _isolated_home / "jobs" / job.id / "run"
        assert job.status == "succeeded", (job.error, (run.parent / "train.log").read_text()[-3000:])
        assert job.hyperparameters.to_dict().get("n_workers") == 2
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(m.startswith("Step 2/2") for m in events), events  # rows streamed back from rank 0
        assert any(m.startswith("Checkpoint created at step 2") for m in events), events
        info = json.loads((run / "run.json").read_text())
        assert info["resolved"]["world_size"] == 2 and info["status"] == "finished"
        assert info["config"]["out"] == str(run)  # this machine's paths, not the Ray workers' temporary ones
        assert list(storage.iterdir()), "no checkpoint went through Ray's storage path"
    finally:
        serve.terminate()
        serve.wait(timeout=60)

    # The same run with torchrun's 2 processes on this machine.
    local = tmp_path / "nproc2"
    proc = subprocess.run(TUNESMITH + ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(local),
                                       "--seed", "5", "--epochs", "1", "--batch-size", "8", "--nproc", "2",
                                       "--save-every-steps", "2"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ray_w, local_w = _weights(run / "adapter"), _weights(local / "adapter")
    assert ray_w.keys() == local_w.keys() and ray_w
    for k in ray_w:
        assert (ray_w[k] - local_w[k]).abs().max() < 1e-5, k
    assert abs(json.loads((local / "run.json").read_text())["metrics"]["train_loss"]
               - info["metrics"]["train_loss"]) < 1e-5


def _ray_train_workers(log: Path) -> list[int]:
    """PIDs of the job's Ray Train workers, as Ray's controller lists them in the driver's log
    ("- (ip=..., pid=N) world_rank=R, ...") once the worker group has started."""
    return [int(pid) for pid in re.findall(r"pid=(\d+)\) world_rank=\d", log.read_text())]


def _registered_checkpoint(storage: Path) -> str | None:
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being written
            continue
        if latest:
            return str(latest)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_ray_worker_resumes_from_the_checkpoint_and_pause_saves_and_stops_the_ray_job(
        ray_cluster, jobs_server, tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.jobs.worker import Executor

    # The driver (a child of this process) passes it on to Ray Train's controller.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

    storage = tmp_path / "ray-storage"
    live = jobs_server(lease_s=30, executor=Executor("ray", ray_cluster, str(storage)))
    client = live.client
    f = client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=24), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=1,
                                         hyperparameters={"n_epochs": 20, "batch_size": 4, "n_workers": 2})

    log_path = live.home / "jobs" / job.id / "train.log"
    workers = wait_for(lambda: log_path.is_file() and len(_ray_train_workers(log_path)) >= 2 and
                       _ray_train_workers(log_path), 240, "the Ray workers to start")
    # Kill rank 1 once Ray has registered a checkpoint (its controller collects the workers'
    # reports when it polls them, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, and then records
    # them in checkpoint_manager_snapshot.json); most of the 120 steps are still to go.
    deadline = time.monotonic() + 240
    while not _registered_checkpoint(storage):
        assert time.monotonic() < deadline, "Ray registered no checkpoint"
        time.sleep(0.02)
    os.kill(workers[1], signal.SIGKILL)

    # Ray replaces the worker group, which resumes from the checkpoint, not from step 0.
    wait_for(lambda: "resuming" in log_path.read_text(), 240, "the new worker group to resume")
    second = _ray_train_workers(log_path)[2:4]
    assert len(second) == 2 and workers[1] not in second, second
    # Pause stops the Ray job as SIGTERM stops a local run: the workers finish their step, save
    # it (off the every-6-steps interval, as a rule) and end, then the driver exits.
    client.fine_tuning.jobs.pause(job.id)
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused", 60, "the pause")
    wait_for(lambda: not any(_alive(p) for p in second), 60, "the Ray workers to end")
    paused = wait_for(lambda: re.search(r"Training paused; checkpoint step (\d+) kept", " | ".join(
        e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200))), 60, "the pause's event")
    at = int(paused.group(1))
    log = log_path.read_text()
    assert f"stopped by its executor (pause or cancel) at step {at}/120; checkpoint step {at} saved" in log, log[-3000:]
    run = live.home / "jobs" / job.id / "run"
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == at and (run / "checkpoints" / f"step-{at:06d}").is_dir()  # every step trained is kept
    client.fine_tuning.jobs.resume(job.id)

    job = wait_for(_finished(client, job.id), 300, "the job to finish after the lost worker and the pause")
    log = log_path.read_text()
    assert job.status == "succeeded", (job.error, log[-3000:])
    # Two resumed worker groups (after the kill, after the pause), each in its own run directory;
    # the second from the step the pause saved: nothing was redone.
    assert len(set(re.findall(r"resuming (\S+) from step-", log))) >= 2, log[-3000:]
    assert re.search(rf"resuming \S+ from step-{at:06d}", log), log[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121)), steps  # every step once: the redone ones replaced, none missing
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert any(m.startswith("Training paused") for m in events), events


def test_a_cluster_address_that_answers_nothing_is_one_sentence(tiny_model_dir, tmp_path):
    """Ray's own connect retries an address with nothing behind it for minutes; the executor
    tries a TCP connection first and says what to do."""
    from in_process import run_tunesmith

    data = tmp_path / "train.jsonl"
    write_chat_jsonl(data, 4)
    address = f"127.0.0.1:{_free_port()}"  # bound and released: nothing listens there
    result = run_tunesmith("train", "--model", tiny_model_dir, "--data", data, "--max-steps", 1,
                           "--out", tmp_path / "run", "--ray-address", address)
    assert result.returncode != 0
    assert f"--ray-address {address}: no Ray cluster answered" in result.stderr
    assert "ray start --head" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "ray.json").exists()
