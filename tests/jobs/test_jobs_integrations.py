"""`integrations` on the jobs API: OpenAI's W&B shape and tunesmith's mlflow, tensorboard and
trackio in the same pattern, through the official openai client against a live server; the
job trains the tiny model and each tracker's files are read back.

    python -m pytest tests/jobs/test_jobs_integrations.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from jobs_helpers import jobs_server, wait_for, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from test_tracking_sinks import wandb_records  # noqa: E402

HP = {"n_epochs": 1, "batch_size": 4}


def _create(live, tmp_path, model, integrations, validation: bool = False):
    train = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "train.jsonl", n=12), "rb"),
                                     purpose="fine-tune")
    valid = live.client.files.create(file=open(write_chat_jsonl(tmp_path / "valid.jsonl", n=3), "rb"),
                                     purpose="fine-tune") if validation else None
    return live.client.fine_tuning.jobs.create(model=str(model), training_file=train.id, integrations=integrations,
                                               validation_file=valid.id if valid else openai.NOT_GIVEN,
                                               method={"type": "supervised", "supervised": {"hyperparameters": HP}})


def test_a_job_reports_to_wandb_in_openais_shape_and_to_mlflow_and_tensorboard(jobs_server, tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    pytest.importorskip("wandb"), pytest.importorskip("mlflow"), pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the worker's training child inherits it
    live = jobs_server(workers=1)
    db = live.home / "mlflow.db"  # a store on the server's disk: under a folder clients may name
    integrations = [
        {"type": "wandb", "wandb": {"project": "tuning", "entity": None, "name": None, "tags": ["custom"]}},
        {"type": "mlflow", "mlflow": {"project": "tuning", "tracking_uri": f"sqlite:///{db}"}},
        {"type": "tensorboard"},
    ]
    job = _create(live, tmp_path, tiny_model_dir, integrations, validation=True)
    assert [i.type for i in job.integrations] == ["wandb", "mlflow", "tensorboard"]
    assert job.integrations[0].wandb.project == "tuning" and job.integrations[0].wandb.tags == ["custom"]

    job = wait_for(lambda: (j := live.client.fine_tuning.jobs.retrieve(job.id)).status in
                   ("succeeded", "failed", "cancelled") and j, 240, "the job to finish")
    assert job.status == "succeeded", job.error
    run_dir = live.home / "jobs" / job.id / "run"
    steps = {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    evaluation = json.loads((live.home / "jobs" / job.id / "evaluation" / "evaluation.json").read_text())
    main = evaluation["main_metric"]
    tuned = evaluation["tuned"]["scores"][main]

    # Training's W&B run, then the evaluation stage continuing it (same run id, offline: a second file).
    training_file, eval_file = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert training_file.name == eval_file.name
    eval_history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                    for r in wandb_records(eval_file) if r.WhichOneof("record_type") == "history"]
    assert [h[f"eval/tuned_{main}"] for h in eval_history] == pytest.approx([tuned])
    records = wandb_records(training_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tuning" and run.display_name == job.id
    assert list(run.tags) == ["tunesmith/finetune", f"tunesmith/{tiny_model_dir.name}", f"tunesmith/{job.id}", "custom"]
    assert {r.history.step.num for r in records if r.WhichOneof("record_type") == "history"} == steps

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (mrun,) = client.search_runs([client.get_experiment_by_name("tuning").experiment_id])
    assert mrun.info.run_name == job.id and mrun.data.tags[f"tunesmith/{job.id}"] == "true"
    assert {m.step for m in client.get_metric_history(mrun.info.run_id, "train_loss")} == steps
    (evaluated,) = client.get_metric_history(mrun.info.run_id, f"eval/tuned_{main}")
    assert evaluated.value == pytest.approx(tuned) and evaluated.step == max(steps)
    assert "eval/base_loss" in client.get_run(mrun.info.run_id).data.metrics
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = list(live.client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert not [e for e in events if e.message.startswith("Tracker")]


@pytest.mark.parametrize(("integrations", "expected"), [
    ([{"type": "wandb"}], "needs its settings under 'wandb'"),
    ([{"type": "wandb", "mlflow": {"project": "x"}}], "put them under 'wandb'"),
    ([{"type": "tensorboard"}, {"type": "tensorboard"}], "a second 'tensorboard' integration"),
    ([{"type": "wandb", "wandb": {"project": "a"}}, {"type": "trackio", "trackio": {"project": "b"}}],
     "different projects (wandb: a, trackio: b)"),
    ([{"type": "mlflow", "mlflow": {"project": "a", "tracking_uri": "sqlite:////etc/mlflow.db"}}],
     "outside the folders the server allows"),
])
def test_malformed_integrations_are_a_400_that_says_what_to_change(jobs_server, tmp_path, tiny_model_dir, integrations,
                                                                   expected):
    live = jobs_server(workers=0)
    with pytest.raises(openai.BadRequestError) as exc:
        _create(live, tmp_path, tiny_model_dir, integrations)
    assert expected in exc.value.message
    assert live.client.fine_tuning.jobs.list().data == []


def test_a_tracker_not_installed_on_the_server_is_refused_at_creation(jobs_server, tmp_path, tiny_model_dir,
                                                                       monkeypatch):
    from tunesmith.tracking import base

    real = base.importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    live = jobs_server(workers=0)
    with pytest.raises(openai.BadRequestError) as exc:
        _create(live, tmp_path, tiny_model_dir, [{"type": "wandb", "wandb": {"project": "p"}}])
    assert "pip install 'tunesmith[wandb]'" in exc.value.message and exc.value.code == "integration_not_installed"


def test_a_tracker_that_fails_is_one_warning_event_and_the_job_succeeds(jobs_server, tmp_path, tiny_model_dir):
    pytest.importorskip("mlflow")
    live = jobs_server(workers=1)
    # The store's folder is a regular file: MLflow cannot create it and fails at once. (A
    # database path that is a folder fails too, but only after MLflow's ten connection retries
    # with back-off, about 100 s of sleeping.)
    not_a_folder = live.home / "a-file"
    not_a_folder.write_text("not a folder")
    job = _create(live, tmp_path, tiny_model_dir,
                  [{"type": "mlflow", "mlflow": {"project": "p", "tracking_uri": f"sqlite:///{not_a_folder}/mlflow.db"}}])
    job = wait_for(lambda: (j := live.client.fine_tuning.jobs.retrieve(job.id)).status in
                   ("succeeded", "failed", "cancelled") and j, 240, "the job to finish")
    assert job.status == "succeeded", job.error
    warnings = [e for e in live.client.fine_tuning.jobs.list_events(job.id, limit=100) if e.message.startswith("Tracker")]
    assert len(warnings) == 1 and warnings[0].level == "warn" and warnings[0].data == {"tracker": "mlflow"}
    assert "mlflow could not start" in warnings[0].message and "training goes on without it" in warnings[0].message
