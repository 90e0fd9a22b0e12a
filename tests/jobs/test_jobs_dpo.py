"""DPO through the jobs API: the official openai client creates a job with
`method={"type": "dpo", "dpo": {"hyperparameters": {"beta": ...}}}` on a live server on
loopback; the worker trains it with `tunesmith train --method dpo`; a file of the wrong
kind for the method fails validation with a sentence; a job whose `model` is an earlier job's
fine-tuned model continues that adapter (SFT, then DPO on its result)."""

from __future__ import annotations

import json
import random

import pytest

from jobs_helpers import jobs_server, wait_for, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

pytest.importorskip("tunesmith.train.run", reason="the training stage (tunesmith train) is not installed")


def write_pairs(path, n=12):
    rng = random.Random(0)
    words = ["card", "password", "France", "dog", "quick", "lazy"]
    rows = [{"prompt": f"topic: {rng.choice(words)} {i}", "chosen": f"wait {w}", "rejected": f"pass {w}"}
            for i, w in enumerate(rng.choice(words) for _ in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _upload(live, path):
    return live.client.files.create(file=open(path, "rb"), purpose="fine-tune")


def _finished(live, job_id):
    job = live.client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def test_dpo_job_trains_with_its_beta_and_reports_rewards(jobs_server, tmp_path, tiny_model_dir):
    from tunesmith.jobs.worker import job_dir

    live = jobs_server(workers=1)
    upload = _upload(live, write_pairs(tmp_path / "pairs.jsonl"))
    assert upload.status_details is None  # a preference file is a valid upload
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}}
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id, method=method,
                                              suffix="prefs", seed=5)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.supervised is None
    job = wait_for(lambda: _finished(live, job.id), 240, "the dpo job to finish")
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    assert job.fine_tuned_model.startswith(f"ft:{tiny_model_dir.name}:prefs:")

    events = list(live.client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events][::-1]
    assert any(m.startswith("Files validated: 12 training preference pairs") and "beta=0.2" in m for m in messages)
    steps = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in steps) == [1, 2, 3]
    assert all(0.0 <= e.data["reward_accuracy"] <= 1.0 and "reward margin=" in e.message for e in steps)
    first = min(steps, key=lambda e: e.data["step"])
    assert abs(first.data["train_loss"] - 0.6931471805599453) < 1e-4  # the adapter starts at zero

    run = json.loads((job_dir(live.store, job.id) / "run" / "run.json").read_text())
    assert run["config"]["method"] == "dpo" and run["config"]["beta"] == 0.2
    assert job.lineage["config"]["method"] == "dpo"

    # The step-metrics result file carries the rewards after OpenAI's columns.
    import csv

    rows = list(csv.DictReader(live.client.files.content(job.result_files[0]).text.splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert list(rows[0])[:3] == ["step", "epoch", "train_loss"]
    for r in rows:
        assert 0.0 <= float(r["reward_accuracy"]) <= 1.0
        assert float(r["reward_margin"]) == pytest.approx(float(r["rewards_chosen"]) - float(r["rewards_rejected"]), abs=1e-5)


def test_a_file_of_the_wrong_kind_fails_validation_with_a_sentence(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=1)
    pairs = _upload(live, write_pairs(tmp_path / "pairs.jsonl")).id
    chat = _upload(live, write_chat_jsonl(tmp_path / "chat.jsonl")).id
    jobs = live.client.fine_tuning.jobs
    supervised = jobs.create(model=str(tiny_model_dir), training_file=pairs)
    dpo = jobs.create(model=str(tiny_model_dir), training_file=chat, method={"type": "dpo"})
    supervised = wait_for(lambda: _finished(live, supervised.id), 60, "the supervised job to fail")
    dpo = wait_for(lambda: _finished(live, dpo.id), 60, "the dpo job to fail")
    assert supervised.status == "failed" and supervised.error.param == "training_file"
    assert "holds preference pairs" in supervised.error.message and '{"type": "dpo"}' in supervised.error.message
    assert dpo.status == "failed" and dpo.error.code == "invalid_training_file"
    assert "holds supervised examples (chat format)" in dpo.error.message
    assert dpo.method.dpo.hyperparameters.beta == "auto"


def test_a_job_continues_an_earlier_jobs_fine_tuned_model(jobs_server, tmp_path, tiny_model_dir):
    """SFT, then DPO on its result, as hosted APIs do it: the second job's `model` is the first
    job's fine_tuned_model. It trains on the same base from that adapter, which is also the DPO
    reference (first loss log(2)); a checkpoint's name works the same way; an unknown ft: name
    is refused at creation."""
    import math

    import openai

    from tunesmith.jobs.worker import job_dir

    live = jobs_server(workers=1)
    jobs = live.client.fine_tuning.jobs
    chat = _upload(live, write_chat_jsonl(tmp_path / "chat.jsonl")).id
    sft = jobs.create(model=str(tiny_model_dir), training_file=chat, suffix="sft", seed=1,
                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    sft = wait_for(lambda: _finished(live, sft.id), 240, "the supervised job to finish")
    assert sft.status == "succeeded", sft.error
    sft_adapter = live.store.storage_root / sft.lineage["adapter"]

    pairs = _upload(live, write_pairs(tmp_path / "pairs.jsonl")).id
    dpo = jobs.create(model=sft.fine_tuned_model, training_file=pairs, suffix="prefs", seed=5,
                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
    assert dpo.model == sft.fine_tuned_model
    dpo = wait_for(lambda: _finished(live, dpo.id), 240, "the dpo job to finish")
    assert dpo.status == "succeeded", dpo.error
    assert dpo.fine_tuned_model.startswith(f"ft:{tiny_model_dir.name}:prefs:")  # named after the base
    assert dpo.lineage["continued_from"] == {"model": sft.fine_tuned_model, "adapter": sft.lineage["adapter"]}
    run = json.loads((job_dir(live.store, dpo.id) / "run" / "run.json").read_text())
    assert run["config"]["model"] == str(tiny_model_dir) and run["config"]["init_adapter"] == str(sft_adapter)
    assert run["resolved"]["reference"] == str(sft_adapter)
    steps = sorted((e for e in jobs.list_events(dpo.id, limit=100) if e.type == "metrics"), key=lambda e: e.data["step"])
    assert abs(steps[0].data["train_loss"] - math.log(2)) < 1e-4  # the policy starts at its reference

    ckpt = list(jobs.checkpoints.list(sft.id))[-1]  # the first epoch's checkpoint
    assert ckpt.step_number < sft.lineage["resolved"]["total_steps"]
    more = jobs.create(model=ckpt.fine_tuned_model_checkpoint, training_file=chat, seed=2,
                       method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    more = wait_for(lambda: _finished(live, more.id), 240, "the job from a checkpoint to finish")
    assert more.status == "succeeded", more.error
    run = json.loads((job_dir(live.store, more.id) / "run" / "run.json").read_text())
    assert run["config"]["method"] == "lora"
    _, ckpt_path = live.store.fine_tuned_model(ckpt.fine_tuned_model_checkpoint)
    assert ckpt_path != sft.lineage["adapter"]  # the checkpoint's adapter, not the final one
    assert run["config"]["init_adapter"] == str(live.store.storage_root / ckpt_path)

    with pytest.raises(openai.BadRequestError) as err:
        jobs.create(model="ft:nothing:here:abc123", training_file=chat)
    assert err.value.code == "model_not_found" and "is not a fine-tuned model here" in err.value.message
