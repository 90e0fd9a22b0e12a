"""`tunesmith sweep`: optuna over a YAML search space, each trial a job on the queue, run by
the sweep's own worker threads on the tiny model; pruning, the results, and a second run
continuing the same study.

    python -m pytest tests/jobs/test_sweep.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from in_process import run_tunesmith
from jobs_helpers import jobs_server  # noqa: F401 (a fixture)

from tunesmith.errors import ConfigError
from tunesmith.jobs.store import open_store
from tunesmith.jobs.sweep_config import load_sweep_config
from tunesmith.train.config import build_config

pytest.importorskip("optuna")


@pytest.fixture
def sweep_dir(tmp_path, tiny_model_dir) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of France? {i}"},
                          {"role": "assistant", "content": f"Paris {i % 3}"}]} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": "train.jsonl", "val_split": 0.25, "max_steps": 4, "batch_size": 4,
        "eval_every_steps": 1, "precision": "fp32"}))
    return tmp_path


def write_sweep(folder: Path, **fields) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "run.yaml", **fields}, sort_keys=False))
    return path


def sweep(path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith", "sweep", "-c", str(path), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def sweep_here(path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same command line in this process (tests/in_process.py); the trials' trainers are
    still child processes, as the jobs worker starts them."""
    return run_tunesmith("sweep", "-c", path, "--out", out, *extra, env={"OMP_NUM_THREADS": "1"})


def test_a_grid_sweep_prunes_the_losing_trial_and_keeps_the_best(sweep_dir, _isolated_home):
    # CSV data, as banking77 comes: the trials' jobs read it through the base config's columns.
    (sweep_dir / "train.csv").write_text("text,category\n" + "".join(
        f"What is the capital of France? {i},Paris {i % 3}\n" for i in range(16)))
    base = yaml.safe_load((sweep_dir / "run.yaml").read_text())
    # 40 steps, a validation loss after each: a 4-step trial on the tiny model could end between
    # two of the sweep's reads (CI, stop 29), and a trial that has ended is rightly recorded as
    # complete, not pruned. The losing trial must outlast several reads to be pruned.
    # A validation file, as bench/banking77_sweep.py has: trials judged on the validation loss
    # skip the jobs' base-against-tuned evaluation of it.
    (sweep_dir / "valid.csv").write_text("text,category\n" + "".join(
        f"What is the capital of France? {i},Paris {i % 3}\n" for i in range(16, 20)))
    base.pop("val_split")
    base.update(data="train.csv", validation="valid.csv", input_column="text", output_column="category", max_steps=40)
    (sweep_dir / "run.yaml").write_text(yaml.safe_dump(base))
    path = write_sweep(sweep_dir, search_space={"learning_rate": {"type": "choice", "values": [1e-2, 1e-7]},
                                                "lora_rank": {"type": "choice", "values": [4]}},
                       sampler="grid", trials=3, parallelism=1)
    out = sweep_dir / "out"
    proc = sweep(path, out)
    assert proc.returncode == 0, proc.stderr

    results = json.loads((out / "sweep.json").read_text())
    trials = {t["params"]["learning_rate"]: t for t in results["trials"]}
    assert len(results["trials"]) == 2  # the grid has two points, fewer than the budget of 3
    assert trials[1e-2]["state"] == "complete" and trials[1e-7]["state"] == "pruned"
    assert list(trials[1e-7]["curve"]) == ["1"]  # pruned on its first validation loss
    assert results["best"]["params"] == {"learning_rate": 1e-2, "lora_rank": 4}
    assert "trial  state" in proc.stdout and "reproduce: tunesmith train -c" in proc.stdout

    store = open_store()
    jobs = {j["id"]: j for j in store.list_jobs(metadata_filter={"sweep": "tiny"})[0]}
    assert {j["status"] for j in jobs.values()} == {"succeeded", "cancelled"}
    assert all(j["validation_file"] and j["metadata"]["sweep_objective"] == "valid_loss" for j in jobs.values())
    events = [e["message"] for j in jobs for e in store.list_events(j, limit=1000)[0]]
    assert not any("Evaluating" in m for m in events) and any("validation loss" in m for m in events)
    best_job = jobs[results["best"]["job_id"]]
    assert best_job["overrides"]["learning_rate"] == 1e-2 and best_job["overrides"]["lora_rank"] == 4
    assert best_job["lineage"]["config"]["lora_rank"] == 4  # the trainer ran with the trial's values
    assert min(results["trials"][0]["curve"].values()) == results["best"]["value"]

    best = yaml.safe_load((out / "best.yaml").read_text())
    cfg = build_config(best)
    assert cfg.learning_rate == 1e-2 and cfg.lora_rank == 4 and Path(cfg.data).is_absolute()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    report = (out / "report.html").read_text()
    assert report.count('class="series"') == 2 and "trial 1 (pruned)" in report and "<tr class=win>" in report


def test_trials_run_in_parallel_and_a_second_run_continues_the_study(sweep_dir, _isolated_home, jobs_server):
    space = {"learning_rate": {"type": "log-uniform", "low": 1e-4, "high": 1e-2},
             "lora_rank": {"type": "int", "low": 2, "high": 8}}
    out = sweep_dir / "out"
    proc = sweep_here(write_sweep(sweep_dir, search_space=space, sampler="random", trials=2, parallelism=2,
                             pruner="none"), out)
    assert proc.returncode == 0, proc.stderr
    store = open_store()
    first = sorted(store.list_jobs(metadata_filter={"sweep": "tiny"})[0], key=lambda j: j["started_at"])
    assert len(first) == 2 and first[1]["started_at"] <= first[0]["finished_at"]  # two workers, at once

    proc = sweep_here(write_sweep(sweep_dir, search_space=space, sampler="random", trials=3, parallelism=2,
                             pruner="none"), out)
    assert proc.returncode == 0, proc.stderr
    assert "2 ended before" in proc.stderr
    results = json.loads((out / "sweep.json").read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1, 2]
    assert all(t["state"] == "complete" and 2 <= t["params"]["lora_rank"] <= 8 for t in results["trials"])
    assert len(store.list_jobs(metadata_filter={"sweep": "tiny"})[0]) == 3  # one new job, not three
    assert set(results["importance"]) == {"learning_rate", "lora_rank"}

    # The server on the same database reads the sweep back for the dashboard: the same
    # trials, curves, best trial and importances as OUT/sweep.json.
    live = jobs_server(workers=0)
    got = httpx.get(f"{live.url}/v1/sweeps/tiny", timeout=60).json()
    assert got["object"] == "sweep" and got["objective"] == "valid_loss" and got["direction"] == "minimize"
    assert [(t["number"], t["state"], t["value"], t["params"], t["job_id"], t["curve"]) for t in got["trials"]] == \
        [(t["number"], t["state"], t["value"], t["params"], t["job_id"], t["curve"]) for t in results["trials"]]
    assert got["best"]["number"] == results["best"]["number"] and got["importance"] == pytest.approx(results["importance"])
    for name, status in (("nope", 404), ("a;b", 404), ("x" * 65, 404)):
        r = httpx.get(f"{live.url}/v1/sweeps/{name}", timeout=60)
        assert r.status_code == status and r.json()["error"]["param"] == "name", (name, r.text)


def test_optuna_sees_validation_losses_by_examples_seen_so_batch_sizes_compare_fairly(sweep_dir, _isolated_home):
    # Step N of a batch-2 trial has seen half the examples of step N of a batch-4 trial: the
    # pruner, which compares trials at equal reported steps, must get examples seen (step x batch
    # size), else it prunes small batches for having trained less (issue 21).
    import optuna

    from tunesmith.jobs.sweep import optuna_url

    space = {"batch_size": {"type": "choice", "values": [4, 2]}, "learning_rate": {"type": "choice", "values": [1e-3]}}
    out = sweep_dir / "out"
    proc = sweep_here(write_sweep(sweep_dir, search_space=space, sampler="grid", trials=2, parallelism=1,
                                  pruner="none"), out)
    assert proc.returncode == 0, proc.stderr

    store = open_store()
    study = optuna.load_study(study_name="tiny", storage=optuna_url(store))
    seen = {t.params["batch_size"]: (t.user_attrs.get("examples_per_step"), t.intermediate_values) for t in study.trials}
    assert set(seen) == {4, 2}
    for batch, (per_step, values) in seen.items():
        job = store.get_job(next(t.user_attrs["job_id"] for t in study.trials if t.params["batch_size"] == batch))
        steps = [e["data"]["step"] for e in reversed(store.list_events(job["id"], limit=1000)[0])
                 if e["type"] == "metrics" and e["data"]["valid_loss"] is not None]
        assert steps == [1, 2, 3, 4]
        assert sorted(values) == [s * batch for s in steps]  # 4, 8, 12, 16 and 2, 4, 6, 8
        assert per_step == batch  # what a restarted sweep and the curves below divide by
    # Only equal training meets: the batch-2 trial's 4 and 8 examples are the batch-4 trial's steps 1 and 2.
    assert set(seen[4][1]) & set(seen[2][1]) == {4, 8}

    # Everything a person reads stays in optimizer steps: the curves of sweep.json (and the dashboard).
    results = json.loads((out / "sweep.json").read_text())
    for t in results["trials"]:
        batch = t["params"]["batch_size"]
        assert list(t["curve"]) == ["1", "2", "3", "4"]
        assert list(t["curve"].values()) == [seen[batch][1][s * batch] for s in (1, 2, 3, 4)]


def test_a_restarted_sweep_reports_each_step_once_on_the_axis_it_began(sweep_dir, _isolated_home):
    # _running_again rebuilds what was reported from optuna's keys (examples seen): a step already
    # reported must not go twice, the next one must go under step x batch size; and a trial a
    # sweep from before examples-seen left running goes on in steps, as it began.
    import optuna

    from tunesmith.jobs.sweep import Watched, _follow, _running_again, optuna_url

    cfg = load_sweep_config(write_sweep(sweep_dir, search_space={}, pruner="none"))
    store = open_store()
    study = optuna.create_study(storage=optuna_url(store), study_name="tiny")

    def running_job(job_id: str, batch_size: int) -> None:
        hp = {"n_epochs": 1, "batch_size": batch_size, "learning_rate_multiplier": 1.0}
        store.create_job({"id": job_id, "model": "tiny", "training_file": "file-x", "validation_file": None,
                          "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}, "seed": 0},
                         first_event="Created")
        store.transition(job_id, ("validating_files",), "running", "Started")

    def loss(job_id: str, step: int) -> None:
        store.add_event(job_id, f"step {step}", type="metrics", data={"step": step, "valid_loss": 1.0 / step})

    new, old = study.ask(), study.ask()
    running_job("ftjob-new", 8)
    running_job("ftjob-old", 8)
    new.set_user_attr("job_id", "ftjob-new")
    old.set_user_attr("job_id", "ftjob-old")
    old.report(1.0, 1)  # a sweep from before reported optimizer steps and set no examples_per_step
    loss("ftjob-old", 1)
    loss("ftjob-new", 1)
    loss("ftjob-new", 2)
    assert _follow(cfg, store, study, Watched(new, "ftjob-new"), print) is False

    loss("ftjob-new", 3)  # logged while no sweep was watching
    loss("ftjob-old", 2)
    watching = _running_again(study, store, print)
    assert [w.job_id for w in watching] == ["ftjob-new", "ftjob-old"]
    for w in watching:
        assert _follow(cfg, store, study, w, print) is False
    values = {t.user_attrs["job_id"]: t.intermediate_values for t in study.get_trials(deepcopy=False)}
    assert values["ftjob-new"] == {8: 1.0, 16: 0.5, 24: pytest.approx(1 / 3)}
    assert values["ftjob-old"] == {1: 1.0, 2: 0.5}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"search_space": {"learning_rate": {"type": "log-uniform", "low": 0, "high": 1}}}, "log-uniform needs low > 0"),
    ({"search_space": {"data": {"type": "choice", "values": ["a.jsonl"]}}}, "the sweep sets data for every trial"),
    ({"search_space": {"lora_rnak": {"type": "int", "low": 2, "high": 8}}}, "did you mean 'lora_rank'?"),
    ({"search_space": {"lora_rank": {"type": "int", "low": 2, "high": 8}}, "sampler": "grid"},
     "sampler grid searches choice parameters only"),
    ({"search_space": {}, "objective": "eval:accuracy"}, "base.validation, which is not set"),
    ({"search_space": {}, "objective": "eval:label_accuracy"},
     "the evaluation reports no score 'label_accuracy'; did you mean 'eval:accuracy'?"),
    ({"search_space": {}, "trails": 3}, "unknown key 'trails'; did you mean 'trials'?"),
])
def test_a_bad_sweep_file_says_what_to_change(sweep_dir, fields, expected):
    with pytest.raises(ConfigError) as exc:
        load_sweep_config(write_sweep(sweep_dir, **fields))
    assert expected in str(exc.value)


@pytest.mark.parametrize(("objective", "expected"), [
    ("eval:accuracy", 0.75), ("eval:macro_f1", 0.5), ("eval:loss", 0.5), ("eval:perplexity", 1.6487212707),
])
def test_an_eval_objective_is_read_from_the_jobs_evaluation(sweep_dir, objective, expected):
    """The worker's evaluation.json holds the scores, and the loss beside them."""
    from tunesmith.jobs.sweep import _objective

    base = yaml.safe_load((sweep_dir / "run.yaml").read_text())
    base.pop("val_split")
    (sweep_dir / "valid.jsonl").write_text((sweep_dir / "train.jsonl").read_text())
    cfg = load_sweep_config(write_sweep(sweep_dir, search_space={}, objective=objective,
                                        base={**base, "validation": "valid.jsonl"}))
    job = {"lineage": {"evaluation": {"metric": "label", "base": {"scores": {"accuracy": 0.1}, "loss": 2.0},
                                      "tuned": {"scores": {"accuracy": 0.75, "macro_f1": 0.5}, "loss": 0.5}}}}
    assert _objective(cfg, job, {}) == pytest.approx(expected)
    assert cfg.direction == ("minimize" if objective in ("eval:loss", "eval:perplexity") else "maximize")
