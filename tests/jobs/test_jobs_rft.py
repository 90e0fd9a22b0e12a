"""Reinforcement fine-tuning through the jobs API: the official openai client creates jobs with
`method={"type": "reinforcement", "reinforcement": {"grader": ..., "hyperparameters": ...}}` on a
live server on loopback, the worker trains them with `tunesmith train --method reinforcement`, and
the job's events carry the reward metrics; a malformed grader is a 400 naming the field."""

from __future__ import annotations

import json
import random

import pytest

from jobs_helpers import finished as _finished
from jobs_helpers import jobs_server, wait_for  # noqa: F401 (jobs_server is a fixture)
from jobs_helpers import upload as _upload

pytest.importorskip("tunesmith.reinforce.run", reason="reinforcement fine-tuning is not installed")

WORDS = ["card", "password", "France", "dog", "quick", "lazy"]
HP = {"n_epochs": 1, "batch_size": 4, "group_size": 2, "max_completion_tokens": 8, "eval_interval": 2}
LABEL = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.letter}}",
         "operation": "ilike"}
NEAR = {"type": "text_similarity", "name": "near", "input": "{{sample.output_text}}", "reference": "say {{item.letter}}",
        "evaluation_metric": "fuzzy_match"}
LENGTH = {"type": "python", "name": "length",
          "source": "def grade(sample, item):\n    return min(len(sample['output_text']), 20) / 20\n"}


def write_prompts(path, n=12, seed=0):
    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": f"say {rng.choice(WORDS)} {i}"}], "letter": rng.choice("aeiou")}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics_events(live, job_id):
    return [e for e in live.client.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"]


def test_a_reinforcement_job_with_a_multi_grader_reports_rewards(jobs_server, tmp_path, tiny_model_dir):
    """One job exercises string_check, text_similarity, python and multi at once (multi's sub-graders)."""
    from tunesmith.jobs.worker import job_dir

    live = jobs_server(workers=1, allow_python_graders=True)
    upload = _upload(live, write_prompts(tmp_path / "prompts.jsonl"))
    assert upload.status_details is None  # rows with fields beside messages are a valid upload
    valid = _upload(live, write_prompts(tmp_path / "valid.jsonl", n=2, seed=1))
    multi = {"type": "multi", "name": "both", "graders": {"label": LABEL, "length": LENGTH, "near": NEAR},
             "calculate_output": "0.4 * label + 0.3 * length + 0.3 * near"}
    jobs = live.client.fine_tuning.jobs
    created = [jobs.create(model=str(tiny_model_dir), training_file=upload.id, validation_file=valid.id, seed=3,
                           method={"type": "reinforcement", "reinforcement": {"grader": g, "hyperparameters": HP}})
               for g in (multi,)]
    assert created[0].method.type == "reinforcement" and created[0].method.reinforcement.grader.type == "multi"
    assert set(created[0].method.reinforcement.grader.graders) == {"label", "length", "near"}
    for job, grader in zip(created, (multi,)):
        job = wait_for(lambda: _finished(live, job.id), 300, "the reinforcement job to finish")
        assert job.status == "succeeded", job.error
        assert job.trained_tokens and job.trained_tokens > 3 * 4 * 2  # 3 steps of 4 prompts x 2 answers
        hp = job.method.reinforcement.hyperparameters
        assert hp.group_size == 2 and hp.batch_size == 4 and hp.n_epochs == 1 and hp.kl_coef == 0.0
        steps = _metrics_events(live, job.id)
        assert sorted(e.data["step"] for e in steps) == [1, 2, 3]
        for e in steps:
            assert 0.0 <= e.data["reward_mean"] <= 1.0 and e.data["reward_std"] >= 0.0
            assert 0.0 <= e.data["zero_variance_groups"] <= 1.0 and e.data["grader_errors"] == 0
            assert 1 <= e.data["completion_tokens"] <= 8 and "reward=" in e.message
        assert {e.data["step"] for e in steps if "valid_reward" in e.data} == {2, 3}
        messages = [e.message for e in jobs.list_events(job.id, limit=100)]
        assert any(m.startswith("Files validated: 12 training prompts") and "group_size=2" in m for m in messages)
        run = json.loads((job_dir(live.store, job.id) / "run" / "run.json").read_text())
        assert run["config"]["method"] == "reinforcement" and run["resolved"]["grader"]["name"] == grader["name"]
        import csv

        table = list(csv.DictReader(live.client.files.content(job.result_files[0]).text.splitlines()))
        assert [int(r["step"]) for r in table] == [1, 2, 3] and 0.0 <= float(table[0]["reward_mean"]) <= 1.0


def test_a_malformed_grader_is_a_400_naming_the_field(jobs_server, tmp_path, tiny_model_dir):
    import openai

    live = jobs_server(workers=0)
    upload = _upload(live, write_prompts(tmp_path / "prompts.jsonl"))
    jobs = live.client.fine_tuning.jobs

    def refused(grader):
        with pytest.raises(openai.BadRequestError) as err:
            jobs.create(model=str(tiny_model_dir), training_file=upload.id,
                        method={"type": "reinforcement", "reinforcement": {"grader": grader}})
        return err.value.body

    body = refused({**LABEL, "operation": "contains"})
    assert body["param"] == "method.reinforcement.grader.operation" and body["code"] == "invalid_grader"
    body = refused({"type": "multi", "name": "m", "graders": {"a": {**LABEL, "input": "{{answer}}"}},
                    "calculate_output": "a"})
    assert body["param"] == "method.reinforcement.grader.graders.a.input"
    body = refused(LENGTH)  # this server was not started with --allow-python-graders
    assert body["param"] == "method.reinforcement.grader.type" and "--allow-python-graders" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        jobs.create(model=str(tiny_model_dir), training_file=upload.id, method={"type": "reinforcement"})
    assert err.value.body["param"] == "method.reinforcement.grader"
    # A prompts file is refused by a supervised job, with the method that takes it.
    live2 = jobs_server(workers=1)
    upload = _upload(live2, write_prompts(tmp_path / "prompts.jsonl"))
    job = live2.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id)
    job = wait_for(lambda: _finished(live2, job.id), 60, "the supervised job to fail")
    assert job.status == "failed" and '"reinforcement"' in job.error.message


@pytest.mark.parametrize("kind", ["score_model", "label_model"])
def test_a_model_judge_asks_the_same_server(jobs_server, tmp_path, tiny_model_dir, kind):
    """The judge (score_model or label_model) is the tiny model served by the server that runs
    the job: every answer is judged through its chat completions (a judge that could not be
    reached would be a model_grader_server_error in samples.jsonl)."""
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.jobs.worker import job_dir
    from tunesmith.serve.app import create_app

    engine = LocalEngine.load(str(tiny_model_dir))
    try:
        live = jobs_server(workers=1, engine=engine, app_factory=lambda s: create_app(engine, routers=[s.router]))
        upload = _upload(live, write_prompts(tmp_path / "prompts.jsonl", n=10))
        judge = {"type": "score_model", "name": "judge", "model": tiny_model_dir.name, "range": [0, 10],
                 "sampling_params": {"temperature": 0, "max_completions_tokens": 12},
                 "input": [{"role": "system", "content": "Score the answer from 0 to 10. Reply in JSON."},
                           {"role": "user", "content": "Question: {{item.messages}}\nAnswer: {{sample.output_text}}"}]}
        if kind == "label_model":
            judge = {"type": "label_model", "name": "judge", "model": tiny_model_dir.name,
                     "input": [{"role": "user", "content": "Is '{{sample.output_text}}' polite? Answer in JSON."}],
                     "labels": ["yes", "no"], "passing_labels": ["yes"]}
        hp = {"n_epochs": 1, "batch_size": 5, "group_size": 2, "max_completion_tokens": 6}
        job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id, method={
            "type": "reinforcement", "reinforcement": {"grader": judge, "hyperparameters": hp}})
        assert job.method.reinforcement.grader.type == kind
        job = wait_for(lambda: _finished(live, job.id), 300, "the judged job to finish")
        assert job.status == "succeeded", job.error
        assert sorted(e.data["step"] for e in _metrics_events(live, job.id)) == [1, 2]
        samples = [json.loads(x) for x in (job_dir(live.store, job.id) / "run" / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 20
        assert not any("model_grader_server_error" in s["errors"] for s in samples), samples[0]["errors"]
    finally:
        engine.close()
