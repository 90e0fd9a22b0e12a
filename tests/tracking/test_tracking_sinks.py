"""The trackers, real and offline: the CLI trains the tiny model with --report-to, and each
tracker's own files are read back with that tracker's reader (W&B's run file, MLflow's
search_runs on a SQLite store, TensorBoard's event reader, trackio's local store).

    python -m pytest tests/tracking -q
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import ConfigError
from tunesmith.tracking import base
from tunesmith.tracking.base import TrackingSettings, check_trackers
from tunesmith.tracking.sinks import Tracking, read_tracking_file

TUNESMITH = [sys.executable, "-m", "tunesmith"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of France? {i}"},
                          {"role": "assistant", "content": f"Paris {i % 3}"}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model: Path, data: Path, out: Path, *extra: str, env: dict[str, str],
          in_process: bool = False) -> subprocess.CompletedProcess:
    """`tunesmith train` on the tiny model; in_process: the same command line in this process
    (tests/in_process.py), sparing a child's torch import."""
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--val-split", "0.25", "--eval-every-steps", "2", "--precision", "fp32", *extra]
    if in_process:
        from in_process import run_tunesmith

        return run_tunesmith(*args, env=env)
    return subprocess.run([*TUNESMITH, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (.wandb): W&B's documented LevelDB-log layout, 32 KiB blocks
    of chunks with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, out, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_train_reports_to_every_tracker_and_each_reads_back(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb"), pytest.importorskip("mlflow"), pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    env = {"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    proc = train(tiny_model_dir, chat_file, out, "--report-to", "wandb,mlflow,tensorboard,trackio",
                 "--tracking-project", "demo", "--run-name", "first", "--tracking-tags", "tunesmith/test,tiny",
                 "--mlflow-tracking-uri", f"sqlite:///{db}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: tracker" not in proc.stderr
    rows = metrics_rows(out)
    losses = {r["step"]: r["train_loss"] for r in rows}
    valid = {r["step"]: r["valid_loss"] for r in rows if r["valid_loss"] is not None}
    final = json.loads((out / "run.json").read_text())["metrics"]
    tracking = read_tracking_file(out)
    assert set(tracking["runs"]) == {"wandb", "mlflow", "tensorboard", "trackio"} and tracking["failed"] == {}

    # W&B offline: the run file holds the config, the tags, every row, the summary and the adapter artifact.
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    run = by_kind["run"][0].run
    assert (run.project, run.display_name, list(run.tags)) == ("demo", "first", ["tunesmith/test", "tiny"])
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["config"]["max_steps"] == 4 and config["resolved"]["total_steps"] == 4
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in by_kind["history"]]
    assert {h["_step"]: h["train_loss"] for h in history} == pytest.approx(losses)
    assert {h["_step"]: h["valid_loss"] for h in history if "valid_loss" in h} == pytest.approx(valid)
    assert all("tokens_per_s" in h and "lr" in h and h["grad_norm"] > 0 for h in history)
    summary = {_key(i): json.loads(i.value_json) for r in by_kind["summary"] for i in r.summary.update}
    assert summary["best_step"] == final["best_step"] and summary["steps"] == 4
    assert [a.artifact.type for a in by_kind["artifact"]] == ["model"]
    assert by_kind["artifact"][0].artifact.name.startswith("adapter-")

    # MLflow on SQLite: read back through mlflow.search_runs and the metric history.
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (mrun,) = mlflow.search_runs(experiment_names=["demo"], output_format="list",
                                 filter_string="attributes.run_name = 'first'")
    assert mrun.info.status == "FINISHED" and mrun.info.run_id == tracking["runs"]["mlflow"]
    assert mrun.data.params["config.lora_rank"] == "16" and mrun.data.tags["tunesmith/test"] == "true"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    history = client.get_metric_history(mrun.info.run_id, "train_loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "valid_loss")} == pytest.approx(valid)
    artifacts = [a.path for a in client.list_artifacts(mrun.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in artifacts
    assert list((tmp_path / "mlartifacts").rglob("adapter_model.safetensors"))  # beside the database
    assert "summary.json" in [a.path for a in client.list_artifacts(mrun.info.run_id)]

    # TensorBoard: the event files, through TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train_loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("valid_loss")} == pytest.approx(valid, rel=1e-6)
    assert "tokens_per_s" in acc.Tags()["scalars"] and "config/text_summary" in acc.Tags()["tensors"]

    # trackio: its local store, read by trackio itself (its folder is fixed when it is imported).
    script = ("import json, trackio.sqlite_storage as s; "
              "print(json.dumps({'runs': s.SQLiteStorage.get_runs('demo'), "
              "'logs': s.SQLiteStorage.get_logs('demo', 'first')}, default=str))")
    read = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env})
    assert read.returncode == 0, read.stderr
    stored = json.loads(read.stdout.strip().splitlines()[-1])
    assert stored["runs"] == ["first"]
    assert {r["step"]: r["train_loss"] for r in stored["logs"] if "train_loss" in r} == pytest.approx(losses)


def test_a_tracker_that_cannot_start_is_one_warning_and_training_goes_on(tiny_model_dir, chat_file, tmp_path):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    proc = train(tiny_model_dir, chat_file, out, "--report-to", "tensorboard",
                 "--tensorboard-dir", str(blocker / "logs"), env={"OMP_NUM_THREADS": "1"}, in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: tracker tensorboard could not start") == 1
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    failed = read_tracking_file(out)["failed"]
    assert list(failed) == ["tensorboard"] and "training goes on without it" in failed["tensorboard"]


class FlakySink:
    """A sink whose logging fails on the second row (a tracker server that went away)."""

    name, run_id = "flaky", "r1"

    def __init__(self):
        self.rows: list[int] = []

    def log_metrics(self, metrics, step):
        if self.rows:
            raise ConnectionError("server went away")
        self.rows.append(step)

    def log_summary(self, summary):
        raise AssertionError("a dropped sink is not called again")

    log_artifact = log_summary

    def finish(self, failed):
        raise AssertionError("a dropped sink is not called again")


def test_a_sink_failing_mid_run_is_dropped_after_one_warning(tmp_path):
    sink, warnings = FlakySink(), []
    tracking = Tracking(["flaky"], TrackingSettings(run_dir=tmp_path, project="p", run_name="r"), {},
                        warn=warnings.append, opener=lambda *_: sink)
    for step in (1, 2, 3):
        tracking.log_metrics({"step": step, "train_loss": 1.0, "valid_loss": None})
    tracking.log_summary({"steps": 3})
    tracking.finish()
    assert sink.rows == [1] and len(warnings) == 1
    assert "flaky failed in log_metrics (ConnectionError: server went away)" in warnings[0]
    assert read_tracking_file(tmp_path) == {"runs": {"flaky": "r1"}, "failed": {"flaky": warnings[0][len("warning: tracker "):]}}


def test_a_tracker_not_installed_is_named_with_its_extra(monkeypatch):
    real = base.importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None if name in ("wandb", "trackio") else real(name))
    with pytest.raises(ConfigError) as exc:
        check_trackers(["wandb", "tensorboard", "trackio"])
    text = str(exc.value)
    assert "pip install 'tunesmith[wandb]'" in text and "pip install 'tunesmith[trackio]'" in text
    assert "tensorboard" not in text


def test_eval_by_hand_sends_its_scores_to_the_runs_the_adapter_reported_to(tiny_model_dir, chat_file, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("mlflow"), pytest.importorskip("tensorboard")
    from in_process import run_tunesmith

    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    env = {"OMP_NUM_THREADS": "1"}
    proc = train(tiny_model_dir, chat_file, out, "--report-to", "mlflow,tensorboard", "--tracking-project", "byhand",
                 "--mlflow-tracking-uri", f"sqlite:///{db}", env=env, in_process=True)
    assert proc.returncode == 0, proc.stderr
    test = tmp_path / "held out.jsonl"  # a name a tracker key cannot hold as it is
    test.write_text(chat_file.read_text())
    ev = run_tunesmith("eval", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--data", str(test),
                       "--limit", "4", "--max-new-tokens", "4", "--metric", "exact", "--out", str(tmp_path / "eval"),
                       env=env)
    assert ev.returncode == 0, ev.stderr
    assert "sent 2 scores to mlflow, tensorboard" in ev.stderr
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    last_step = json.loads((out / "run.json").read_text())["metrics"]["steps"]

    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    (mrun,) = mlflow.search_runs(experiment_names=["byhand"], output_format="list")
    assert mrun.info.run_id == read_tracking_file(out)["runs"]["mlflow"]  # the training's own run, continued
    (point,) = MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(mrun.info.run_id,
                                                                               "eval/held_out/exact_match")
    assert (point.step, point.value) == (last_step, pytest.approx(scores["scores"]["exact_match"]))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/held_out/loss")] == [(last_step, pytest.approx(scores["loss"]))]

    # --no-trackers keeps an evaluation out of them.
    ev = run_tunesmith("eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(test),
                       "--limit", "4", "--max-new-tokens", "4", "--metric", "exact", "--out", str(tmp_path / "eval2"),
                       "--no-trackers", env=env)
    assert ev.returncode == 0 and "sent" not in ev.stderr
