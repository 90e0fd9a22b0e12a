"""A jobs worker that shares only the database and a storage URI (`--storage`) with the API
node, not `$TUNESMITH_HOME`: uploads, adapters and result files travel through the storage
(a `file://` folder here, through pyarrow.fs, the code path of s3:// and gs://), checked
against their recorded size and sha256, and no id or name read back leaves the prefix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs_helpers import jobs_server, wait_for, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

pytest.importorskip("pyarrow.fs", reason="--storage needs pyarrow: pip install 'tunesmith[storage]'")


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """The shared storage URI, set for the in-process API node as `serve --storage` would."""
    folder = tmp_path / "object-store"
    folder.mkdir()
    uri = f"file://{folder}"
    monkeypatch.setenv("TUNESMITH_STORAGE", uri)
    return folder, uri


def _serve_app_factory(model_dir):
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.serve.app import create_app

    engine = LocalEngine.load(str(model_dir))
    return engine, lambda service: create_app(engine, routers=[service.router])


def test_a_worker_on_another_home_trains_through_the_storage_and_the_api_serves_the_model(
        jobs_server, storage, tiny_model_dir, tmp_path):
    folder, uri = storage
    engine, factory = _serve_app_factory(tiny_model_dir)
    live = jobs_server(workers=0, engine=engine, app_factory=factory)  # the API node: home A, no worker
    client = live.client
    worker_home = tmp_path / "worker-home"  # home B: shares nothing with A but the database and the storage
    worker_home.mkdir()
    data = write_chat_jsonl(tmp_path / "t.jsonl", n=12)
    f = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    assert (folder / "files" / f"{f.id}.jsonl").read_bytes() == data.read_bytes()  # written through to the storage
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, suffix="far", seed=2,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4})

    env = {**os.environ, "TUNESMITH_HOME": str(worker_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TUNESMITH_STORAGE")  # the worker gets it as --storage
    worker = subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--db", f"sqlite:///{live.home / 'tunesmith.db'}",
                               "--storage", uri, "--poll-interval-s", "0.3"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in
                       ("succeeded", "failed", "cancelled") and j, 180, "the job to finish on the other home")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_log = worker.communicate(timeout=60)
    assert job.status == "succeeded", (job.error, worker_log[-3000:])

    # Trained on B, from B's copy of the upload (fetched, checked); A never held the run.
    assert (worker_home / "files" / f"{f.id}.jsonl").read_bytes() == data.read_bytes()
    assert (worker_home / "jobs" / job.id / "train.log").is_file()
    assert not (live.home / "jobs" / job.id / "train.log").exists()
    manifest = json.loads((folder / "jobs" / job.id / "run" / "adapter" / "manifest.json").read_text())
    assert "adapter_model.safetensors" in manifest["files"]

    # A fetched the adapter into its own home and answers with the fine-tuned model.
    wait_for(lambda: job.fine_tuned_model in [m.id for m in client.models.list()], 30, "the model to be served")
    fetched = live.home / "jobs" / job.id / "run" / "adapter" / "adapter_model.safetensors"
    assert fetched.read_bytes() == (worker_home / "jobs" / job.id / "run" / "adapter" /
                                    "adapter_model.safetensors").read_bytes()
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens >= 1
    # The worker's result file (step metrics) is read on A through the storage too.
    csv_text = client.files.content(job.result_files[0]).text
    assert csv_text.startswith("step,epoch,train_loss") and len(csv_text.strip().splitlines()) == 4  # 3 steps
    # So is the checkpoint the worker recorded (one per epoch: step 3), served as a model.
    assert (folder / "jobs" / job.id / "checkpoints" / "step-000003" / "manifest.json").is_file()
    wait_for(lambda: f"{job.fine_tuned_model}:ckpt-step-3" in [m.id for m in client.models.list()], 30,
             "the checkpoint to be served")
    # Deleting the upload deletes the storage's copy too.
    assert client.files.delete(f.id).deleted and not (folder / "files" / f"{f.id}.jsonl").exists()


def test_an_upload_the_storage_refuses_is_a_503_and_leaves_no_file(jobs_server, storage, tmp_path):
    import openai

    folder, _ = storage
    (folder / "files").write_text("a file where the storage's files/ folder should be")
    live = jobs_server(workers=0)
    with pytest.raises(openai.APIStatusError) as err:
        live.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl"), "rb"), purpose="fine-tune")
    assert err.value.status_code == 503 and err.value.body["param"] == "file"
    assert "shared storage" in err.value.body["message"] and "object-store" not in err.value.body["message"]
    assert live.client.files.list().data == [] and not list((live.home / "files").glob("file-*"))


def test_ray_checkpoints_default_to_the_storage():
    from tunesmith.cli.serve import _ray_storage

    assert _ray_storage(None, "s3://bucket/tunesmith/", "ray") == "s3://bucket/tunesmith/ray"
    assert _ray_storage("s3://other/ray", "s3://bucket/tunesmith", "ray") == "s3://other/ray"
    assert _ray_storage(None, "s3://bucket/tunesmith", "local") is None


def test_a_changed_upload_in_the_storage_fails_the_job_with_a_sentence(jobs_server, storage, tiny_model_dir, tmp_path):
    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import Worker, WorkerConfig
    from tunesmith.settings import Settings

    folder, uri = storage
    live = jobs_server(workers=0)
    f = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"), purpose="fine-tune")
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id)
    stored = folder / "files" / f"{f.id}.jsonl"
    stored.write_text(stored.read_text().replace("Paris", "Lyons"))  # same size, other bytes

    other = Settings(home=tmp_path / "worker-home", api_key=None, storage=uri)
    store = open_store(f"sqlite:///{live.home / 'tunesmith.db'}", other)
    assert Worker(store, WorkerConfig(), log=lambda _: None).run_once()
    done = live.client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "failed" and done.error.param == "training_file"
    assert "does not match its recorded sha256" in done.error.message, done.error.message
    assert not (other.home / "files" / f"{f.id}.jsonl").exists()  # nothing unchecked is kept


def test_hostile_paths_never_leave_the_prefix_or_the_home(tmp_path):
    from tunesmith.jobs.shared_storage import MANIFEST_FILE, SharedStorage, StorageError

    remote, home = tmp_path / "store", tmp_path / "home"
    (remote / "jobs" / "j1" / "adapter").mkdir(parents=True)
    home.mkdir()
    shared = SharedStorage(f"file://{remote}", home)
    for rel in ("../outside.jsonl", "/etc/passwd", "files/../../x", "files/.hidden", "files/a\\..\\..\\b", ""):
        with pytest.raises(StorageError, match="refusing storage path"):
            shared.fetch_file(rel)
    # A manifest that names a file outside its folder is refused before anything is written.
    (remote / "jobs" / "j1" / "adapter" / MANIFEST_FILE).write_text(
        json.dumps({"files": {"../../../../escaped": {"bytes": 1, "sha256": "0" * 64}}}))
    with pytest.raises(StorageError, match="refusing storage path"):
        shared.fetch_dir("jobs/j1/adapter")
    assert not list(tmp_path.rglob("escaped")) and not (home / "jobs" / "j1" / "adapter").exists()
    assert shared.fetch_dir("jobs/j2/adapter") is None  # never published: nothing to fetch

    # A folder round trip, and a symlink in the home that points away is not followed.
    (home / "jobs" / "j3" / "adapter").mkdir(parents=True)
    (home / "jobs" / "j3" / "adapter" / "adapter_config.json").write_text("{}")
    shared.put_dir("jobs/j3/adapter")
    other = SharedStorage(f"file://{remote}", tmp_path / "home2")
    assert (other.fetch_dir("jobs/j3/adapter") / "adapter_config.json").read_text() == "{}"
    (tmp_path / "home2" / "files").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StorageError, match="resolves outside"):
        other.fetch_file("files/file-1.jsonl")


def test_a_storage_uri_pyarrow_cannot_open_is_one_sentence():
    from in_process import run_tunesmith

    r = run_tunesmith("worker", "--storage", "nosuchscheme://bucket/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --storage 'nosuchscheme://bucket/x'") and "s3://bucket/prefix" in r.stderr


def _worker(home: Path, db: str, uri: str) -> subprocess.Popen:
    env = {**os.environ, "TUNESMITH_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TUNESMITH_STORAGE", None)
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--db", db, "--storage", uri,
                             "--poll-interval-s", "0.3"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_a_paused_job_resumes_on_another_machine_from_its_checkpoint(jobs_server, storage, tiny_model_dir, tmp_path):
    folder, uri = storage
    live = jobs_server(workers=0)
    jobs = live.client.fine_tuning.jobs
    db = f"sqlite:///{live.home / 'tunesmith.db'}"
    f = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"), purpose="fine-tune")
    job = jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=4,
                      hyperparameters={"n_epochs": 20, "batch_size": 4})  # 60 steps, a checkpoint every 3

    def events():
        return [e.message for e in jobs.list_events(job.id, limit=200)]

    first = _worker(tmp_path / "home-b", db, uri)
    try:
        wait_for(lambda: jobs.checkpoints.list(job.id).data, 180, "a first checkpoint")
        jobs.pause(job.id)
        paused = wait_for(lambda: next((m for m in events() if m.startswith("Training paused; checkpoint step")), None),
                          60, "the trainer to pause")
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_log = first.communicate(timeout=60)
    at = int(paused.split("checkpoint step ")[1].split(" ")[0])
    manifest = json.loads((folder / "jobs" / job.id / "run-snapshot" / "manifest.json").read_text())
    assert f"checkpoints/step-{at:06d}/optimizer.safetensors" in manifest["files"], (manifest, first_log[-2000:])

    # Another machine (home C) takes the resumed job: from the paused step, not from step 0.
    jobs.resume(job.id)
    second = _worker(tmp_path / "home-c", db, uri)
    try:
        done = wait_for(lambda: (j := jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                        180, "the job to finish on the other machine")
    finally:
        second.send_signal(signal.SIGTERM)
        _, second_log = second.communicate(timeout=60)
    assert done.status == "succeeded", (done.error, second_log[-3000:])
    log = (tmp_path / "home-c" / "jobs" / job.id / "train.log").read_text()
    assert f"resuming {tmp_path / 'home-c' / 'jobs' / job.id / 'run'} from step-{at:06d}" in log, log[-3000:]
    assert events().count("Resuming from the last checkpoint") == 1
    steps = [e.data["step"] for e in jobs.list_events(job.id, limit=300) if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 61))  # every step once: none redone, none missing
