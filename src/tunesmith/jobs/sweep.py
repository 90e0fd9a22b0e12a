"""A hyperparameter sweep: optuna asks for trials, each trial is a job on the durable queue.

N workers (threads of this process, `tunesmith worker`s elsewhere on the same database, or
both) run N trials at once. While a trial trains, its validation losses go to optuna keyed by
training examples seen (step x batch size), whose pruner may stop it early (the job is
cancelled) by comparing trials at equal training, whatever their batch sizes. The optuna
study lives in the jobs database, so killing the sweep and running it again continues it:
trials still running are watched again, and only the missing ones are asked for. At the
end, OUT holds the table of trials, the best trial's config and its adapter.

    tunesmith sweep -c sweep.yaml
    python -c "from tunesmith.jobs.sweep import run_sweep"
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import ConfigError
from tunesmith.fileio import write_atomically
from tunesmith.jobs.store import ACTIVE, TERMINAL, JobStore, new_id
from tunesmith.jobs.sweep_config import BESIDE_SCORES, SweepConfig
from tunesmith.jobs.sweep_report import render_sweep_html
from tunesmith.jobs.worker import Worker, WorkerConfig
from tunesmith.models.registry import DEFAULT_MODEL, load_tokenizer, resolve_model
from tunesmith.runs import ADAPTER_DIR

RESULTS_FILE = "sweep.json"
REPORT_FILE = "report.html"
BEST_CONFIG_FILE = "best.yaml"
SWEEP_KEYS = ("data", "validation", "model", "out", "resume")
"""Base config keys the jobs carry themselves (files, model, folder), never as overrides."""


@dataclass
class Watched:
    trial: Any
    """optuna.trial.Trial, asked or found running again."""
    job_id: str
    reported: set[int] = field(default_factory=set)
    """optuna steps already reported: training examples seen (see _follow)."""
    examples_per_step: int | None = None
    """The job's batch size, once its worker has resolved it (the trial's user attr of that name)."""


EXAMPLES_PER_STEP = "examples_per_step"
"""A trial's user attr: its batch size, the factor from the job's optimizer steps to optuna's
steps (training examples seen). A trial without it (from before) reported optimizer steps."""

# How often the sweep reads its running trials' validation losses: a trial the pruner stops is
# cancelled within this long of the loss that condemned it (a few indexed reads each time).
FOLLOW_INTERVAL_S = 0.25


def run_sweep(cfg: SweepConfig, store: JobStore, out: Path, workers: int | None = None,
              poll_interval_s: float = 1.0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep until `cfg.trials` trials have ended; write OUT/sweep.json,
    OUT/best.yaml and OUT/adapter; return the results."""
    import optuna

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    # The base model's tokenizer, once, here: a missing model is one error before any trial, and
    # transformers' lazy imports are done before worker threads validate files side by side
    # (two threads importing it at once can see a half-initialised module).
    load_tokenizer(resolve_model(cfg.base.get("model", DEFAULT_MODEL)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=optuna_url(store), study_name=cfg.name, direction=cfg.direction,
                                sampler=_sampler(cfg), pruner=_pruner(cfg), load_if_exists=True)
    study.set_user_attr("objective", cfg.objective)  # for load_sweep_results (the dashboard)
    study.set_user_attr("sampler", cfg.sampler)
    files = _files(cfg, store, study)
    if cfg.sampler == "grid" and not study.trials:
        _queue_grid(cfg, study)
    budget = min(cfg.trials, _grid_size(cfg)) if cfg.sampler == "grid" else cfg.trials
    watching = _running_again(study, store, log)
    stop = threading.Event()
    threads = [threading.Thread(target=Worker(store, WorkerConfig(poll_interval_s=poll_interval_s)).run, args=(stop,),
                                name=f"sweep-worker-{i}", daemon=True)
               for i in range(cfg.parallelism if workers is None else workers)]
    for t in threads:
        t.start()
    log(f"sweep {cfg.name}: {budget} trials, {cfg.parallelism} at once, {cfg.sampler} sampler, objective "
        f"{cfg.objective} ({cfg.direction}); {len(_ended(study))} ended before, {len(watching)} still running; "
        f"{len(threads)} worker(s) here")
    try:
        while True:
            while len(watching) < cfg.parallelism and _started(study) < budget:
                watching.append(_start_trial(cfg, store, study, files, log))
            for w in list(watching):
                if _follow(cfg, store, study, w, log):
                    watching.remove(w)
            if not watching and _started(study) >= budget:
                break
            time.sleep(min(poll_interval_s, FOLLOW_INTERVAL_S))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    results = sweep_results(cfg, store, study)
    _write_results(cfg, store, study, results, out)
    return results


def optuna_url(store: JobStore) -> str:
    """The jobs database as optuna's storage (psycopg 3 named explicitly for PostgreSQL)."""
    return store.engine.url.render_as_string(hide_password=False)


def _sampler(cfg: SweepConfig) -> Any:
    import optuna

    # grid: every combination is queued in the study up front (_queue_grid); optuna's GridSampler
    # stops the study from inside, which only works under study.optimize, not ask and tell.
    if cfg.sampler in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(10, max(2, cfg.trials // 4)))


def _pruner(cfg: SweepConfig) -> Any:
    import optuna

    if cfg.pruner == "none" or cfg.objective != "valid_loss":  # only validation loss is known while a trial trains
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, cfg.trials // 4)), n_warmup_steps=0)


def _queue_grid(cfg: SweepConfig, study: Any) -> None:
    """Every combination of the choice values, in order, as trials the study hands out first."""
    import itertools

    keys = list(cfg.search_space)
    for values in itertools.islice(itertools.product(*(cfg.search_space[k].values for k in keys)), cfg.trials):
        study.enqueue_trial(dict(zip(keys, values)))


def _grid_size(cfg: SweepConfig) -> int:
    size = 1
    for p in cfg.search_space.values():
        size *= len(p.values or [])
    return size


def _started(study: Any) -> int:
    """Trials asked for so far (a queued grid point waits until asked)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.WAITING for t in study.trials)


def _ended(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]


def _files(cfg: SweepConfig, store: JobStore, study: Any) -> dict[str, str | None]:
    """The base config's data files as uploaded files, once per study (the same data on a rerun)."""
    base = cfg.base_config()
    wanted = {"training_file": base.data, "validation_file": base.validation}
    known = study.user_attrs.get("files")
    digests = {k: _sha256(Path(p)) if p else None for k, p in wanted.items()}
    if known:
        changed = [k for k in wanted if known[k]["sha256"] != digests[k]]
        if changed:
            raise ConfigError(f"sweep {cfg.name}: {', '.join(changed)} changed since the sweep began ("
                              + ", ".join(str(wanted[k]) for k in changed) + "); give the sweep a new name")
        return {k: v["id"] for k, v in known.items()}
    files = {k: _upload(store, Path(p), digests[k]) if p else None for k, p in wanted.items()}
    study.set_user_attr("files", {k: {"id": files[k], "sha256": digests[k]} for k in wanted})
    return files


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"data file '{path}' of the sweep's base config does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload(store: JobStore, path: Path, digest: str) -> str:
    file_id = new_id("file")
    rel = Path("files") / f"{file_id}{path.suffix}"
    (store.storage_root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, store.storage_root / rel)
    store.publish_file(rel)  # before the row: workers on other machines fetch it (--storage)
    store.add_file({"id": file_id, "created_at": int(time.time()), "bytes": path.stat().st_size,
                    "filename": path.name, "purpose": "fine-tune", "status": "processed", "status_details": None,
                    "sha256": digest, "path": str(rel), "validation": None})
    return file_id


def _suggest(trial: Any, cfg: SweepConfig) -> dict[str, Any]:
    params = {}
    for key, p in cfg.search_space.items():
        if p.type == "choice":
            params[key] = trial.suggest_categorical(key, p.values)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high))
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.type == "log-uniform")
    return params


def _start_trial(cfg: SweepConfig, store: JobStore, study: Any, files: dict[str, str | None],
                 log: Callable[[str], None]) -> Watched:
    """Ask optuna for a trial and queue it as a job whose overrides are the base config plus the trial's values."""
    trial = study.ask()
    params = _suggest(trial, cfg)
    overrides = {k: v for k, v in cfg.base.items() if k not in SWEEP_KEYS}
    overrides.update(params)
    if overrides.get("report_to"):  # each trial its own run in the trackers
        overrides.setdefault("run_name", f"{cfg.name}-trial-{trial.number}")
    hp = {"n_epochs": overrides["epochs"] if isinstance(overrides.get("epochs"), int) else "auto",
          "batch_size": overrides.get("batch_size", "auto"), "learning_rate_multiplier": "auto"}
    job_id = new_id("ftjob")
    store.create_job({
        "id": job_id, "model": cfg.base.get("model", DEFAULT_MODEL), "training_file": files["training_file"],
        "validation_file": files["validation_file"], "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "suffix": f"{cfg.name}-t{trial.number}"[:64], "seed": int(overrides.get("seed", 42)),
        "metadata": _metadata(cfg.name, trial.number, params, cfg.objective), "overrides": overrides,
    }, first_event=f"Created fine-tuning job: {job_id} (sweep {cfg.name}, trial {trial.number})")
    trial.set_user_attr("job_id", job_id)
    log(f"trial {trial.number}: job {job_id}, " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
    return Watched(trial, job_id)


def _metadata(name: str, number: int, params: dict[str, Any], objective: str) -> dict[str, str]:
    """What links a job to its sweep in the jobs API (OpenAI's metadata: strings up to 512 characters).
    `sweep_objective` tells the worker whether the trial needs its evaluation stage (eval:<metric>)."""
    meta = {"sweep": name, "sweep_trial": str(number), "sweep_objective": objective[:512]}
    text = json.dumps(params)
    if len(text) <= 512:
        meta["sweep_params"] = text
    return meta


def _running_again(study: Any, store: JobStore, log: Callable[[str], None]) -> list[Watched]:
    """Trials a killed sweep left running: watched again while their job lives, else failed."""
    import optuna
    from optuna.trial import TrialState

    watching = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        job = store.get_job(t.user_attrs.get("job_id", ""))
        if job is None:
            study.tell(t.number, state=TrialState.FAIL)
            log(f"trial {t.number}: its job is gone; marked failed")
            continue
        if job["status"] == "paused":  # the sweep goes on: a paused trial is queued again
            store.transition(job["id"], ("paused",), "queued", "Job resumed by the sweep")
        # The same factor as before the restart, so each step maps to the key it was reported under
        # (a trial begun before this attr existed reported steps: 1 example per step keeps it whole).
        per_step = t.user_attrs.get(EXAMPLES_PER_STEP, 1 if t.intermediate_values else None)
        watching.append(Watched(optuna.trial.Trial(study, t._trial_id), job["id"],
                                reported=set(t.intermediate_values), examples_per_step=per_step))
    return watching


def _follow(cfg: SweepConfig, store: JobStore, study: Any, w: Watched, log: Callable[[str], None]) -> bool:
    """Report the trial's new validation losses, prune it or record its end; True once it has ended."""
    from optuna.trial import TrialState

    job = store.get_job(w.job_id)
    losses = _valid_losses(store, w.job_id)
    if w.examples_per_step is None and losses:
        w.examples_per_step = _batch_size(job)
        w.trial.set_user_attr(EXAMPLES_PER_STEP, w.examples_per_step)
    # optuna's pruner compares trials at equal reported steps: reported as examples seen, step N of a
    # batch-8 trial meets step N/2 of a batch-16 one, not step N (half as much training).
    for step in sorted(losses):
        seen = step * w.examples_per_step
        if seen in w.reported:
            continue
        w.trial.report(losses[step], seen)
        w.reported.add(seen)
        if job["status"] in ACTIVE and cfg.objective == "valid_loss" and w.trial.should_prune():
            where = f"step {step} ({seen} examples, validation loss {losses[step]:.4f})"
            store.transition(w.job_id, ACTIVE, "cancelled", f"Job cancelled: pruned by sweep {cfg.name} at {where}",
                             finished_at=int(time.time()))
            study.tell(w.trial, state=TrialState.PRUNED)
            log(f"trial {w.trial.number}: pruned at {where}")
            return True
    if job["status"] not in TERMINAL:
        return False
    value = _objective(cfg, job, losses) if job["status"] == "succeeded" else None
    if value is None:
        study.tell(w.trial, state=TrialState.FAIL)
        why = (job["error"] or {}).get("message") or f"no {cfg.objective} was recorded"
        log(f"trial {w.trial.number}: {job['status']} ({why})")
    else:
        study.tell(w.trial, value)
        log(f"trial {w.trial.number}: {cfg.objective} {value:.4f}")
    return True


def _batch_size(job: dict[str, Any]) -> int:
    """Training examples per optimizer step of the job: its batch size as the worker resolved it
    (the trial's own, the base config's, or the worker's "auto"), which is what the trainer runs
    with. batch_size counts examples per optimizer step over all processes, so gradient
    accumulation (micro_batch_size) and --nproc do not change it. The last step of an epoch may
    hold fewer (ceil(n / batch_size) steps), so this counts nominal examples."""
    hp = job["method"][job["method"]["type"]]["hyperparameters"]
    return int(hp["batch_size"])  # resolved before the job trains, so before any validation loss


def _valid_losses(store: JobStore, job_id: str) -> dict[int, float]:
    rows, _ = store.list_events(job_id, limit=100_000)
    return {int(e["data"]["step"]): float(e["data"]["valid_loss"]) for e in rows
            if e["type"] == "metrics" and (e["data"] or {}).get("valid_loss") is not None}


def _objective(cfg: SweepConfig, job: dict[str, Any], losses: dict[int, float]) -> float | None:
    """valid_loss: the best validation loss of the run (its adapter is that checkpoint);
    eval:<metric>: the tuned model's score in the job's evaluation."""
    if cfg.objective == "valid_loss":
        return min(losses.values()) if losses else None
    tuned = ((job["lineage"] or {}).get("evaluation") or {}).get("tuned", {})
    name = cfg.objective.removeprefix("eval:")
    if name in BESIDE_SCORES:
        loss = tuned.get("loss")
        return None if loss is None else float(loss) if name == "loss" else math.exp(float(loss))
    value = (tuned.get("scores") or {}).get(name)
    return float(value) if value is not None else None


def sweep_results(cfg: SweepConfig, store: JobStore, study: Any) -> dict[str, Any]:
    """Every trial (number, state, value, params, job), the best one, and each parameter's importance."""
    return study_results(store, study, cfg.objective, cfg.sampler)


def open_sweep_storage(store: JobStore) -> Any:
    """optuna's storage on the jobs database, to reuse across reads: opening it checks the
    schema (about 0.1 s each time, a second the first)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(optuna_url(store))


def load_sweep_results(store: JobStore, name: str, storage: Any = None) -> dict[str, Any] | None:
    """A sweep's results read back from its optuna study in the jobs database (what the
    dashboard shows while it runs), or None when no sweep has that name. `storage`: one from
    `open_sweep_storage` (else one is opened for this read)."""
    import optuna

    storage = storage if storage is not None else open_sweep_storage(store)
    try:
        storage.get_study_id_from_name(name)  # one query: a missing name costs no more
    except KeyError:
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    attrs = study.user_attrs  # set by run_sweep; a study from before has the defaults
    return study_results(store, study, attrs.get("objective", "valid_loss"), attrs.get("sampler", "tpe"))


def study_results(store: JobStore, study: Any, objective: str, sampler: str) -> dict[str, Any]:
    """The results of a study whose trials are jobs in `store`."""
    import optuna
    from optuna.trial import TrialState

    trials = []
    for t in study.trials:
        job = store.get_job(t.user_attrs.get("job_id", "")) or {}
        per_step = t.user_attrs.get(EXAMPLES_PER_STEP) or 1  # the curve in the job's steps, as its metrics
        trials.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                       "job_id": job.get("id"), "fine_tuned_model": job.get("fine_tuned_model"),
                       "curve": {str(k // per_step): v for k, v in sorted(t.intermediate_values.items())}})
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        job = store.get_job(b.user_attrs["job_id"])
        adapter = (job["lineage"] or {}).get("adapter")
        best = {"number": b.number, "value": b.value, "params": b.params, "job_id": job["id"],
                "fine_tuned_model": job["fine_tuned_model"],
                "adapter": str(store.storage_root / adapter) if adapter else None}
    importance = {}
    if len(complete) >= 2 and complete[0].params:
        try:
            importance = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError):  # e.g. every trial took the same value
            importance = {}
    return {"name": study.study_name, "objective": objective, "direction": study.direction.name.lower(),
            "sampler": sampler, "trials": trials, "best": best, "importance": importance}


def _write_results(cfg: SweepConfig, store: JobStore, study: Any, results: dict[str, Any], out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    results["report"] = str(out / REPORT_FILE)
    best = results["best"]
    if best:
        config = {**cfg.base, **best["params"]}
        write_atomically(out / BEST_CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        results["best"]["command"] = f"tunesmith train -c {out / BEST_CONFIG_FILE}"
        if best["adapter"]:
            shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
            shutil.copytree(best["adapter"], out / ADAPTER_DIR)
    write_atomically(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    write_atomically(out / REPORT_FILE, render_sweep_html(results))


def results_table(results: dict[str, Any]) -> str:
    """The trials as a plain-text table, best first, then the best config and its command."""
    params = sorted({k for t in results["trials"] for k in t["params"]})
    head = ["trial", "state", results["objective"], *params, "job"]
    reverse = results["direction"] == "maximize"
    ordered = sorted(results["trials"], key=lambda t: (t["value"] is None, -(t["value"] or 0) if reverse else (t["value"] or 0)))
    rows = [[str(t["number"]), t["state"], _fmt(t["value"]), *[_fmt(t["params"].get(k)) for k in params], t["job_id"] or "-"]
            for t in ordered]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    best = results["best"]
    if best:
        lines.append(f"best: trial {best['number']}, {results['objective']} {_fmt(best['value'])}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
        lines.append(f"reproduce: {best.get('command', '-')}")
    if results.get("report"):
        lines.append(f"report: {results['report']}")
    if results["importance"]:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in results["importance"].items()))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
