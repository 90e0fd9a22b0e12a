"""A jobs worker: claim a job, validate its files, train it in a child process, publish it.

Training runs through the same entry point as `tunesmith train`, in a child process, so
a crash in training never takes the worker (or the server) down, and cancel/pause are a
SIGTERM away: the trainer saves a checkpoint and exits. While the child runs, the worker
tails `metrics.jsonl` into events, records new checkpoints, renews its heartbeat, and
watches the job's status (cancelled or paused through the API).

If the worker dies (kill -9, lost machine), the kernel sends the child SIGTERM
(PR_SET_PDEATHSIG), its heartbeat lapses, and the next worker to claim the job resumes it
from the last checkpoint; a lock file held by the child keeps the new worker from
starting before the old child has finished writing.

    tunesmith worker --db sqlite:///$HOME/.cache/tunesmith/tunesmith.db
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.example import ColumnMapping
from tunesmith.data.stats import auto_epochs
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.fileio import write_atomically
from tunesmith.jobs.evaluation_stage import BASE_EVALUATIONS, SUMMARY_FILE, summary_sentence
from tunesmith.jobs.ray_executor import RAY_MISSING, ray_available
from tunesmith.jobs.run_reader import MetricsTail, has_checkpoint, last_error, metrics_csv, trained_tokens
from tunesmith.jobs.run_snapshot import snapshot_run
from tunesmith.jobs.shared_storage import StorageError
from tunesmith.jobs.store import JobStore, new_id
from tunesmith.jobs.validation import AUDIT_CHECKS, MIN_EXAMPLES, check_file, check_prompt_file, method_mismatch
from tunesmith.runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_FILES,
    CHECKPOINTS_DIR,
    RUN_FILE,
    STATE_FILE,
    TRAIN_METRICS_FILE,
    list_checkpoints,
    read_run_json,
)
from tunesmith.tracking.sinks import read_tracking_file
from tunesmith.train.config import DEFAULT_BETA, DEFAULT_GROUP_SIZE, DEFAULT_LEARNING_RATE, RL_DEFAULTS
from tunesmith.train.progress import DPO_METRIC_KEYS, RFT_METRIC_KEYS

ModelReady = Callable[[str, Path], None]
"""Called with (model name, adapter directory) when a model (or checkpoint) is published."""


@dataclass(frozen=True)
class Executor:
    """`--executor local` (the child trains here, `--nproc n_workers`) or `--executor ray`
    (the child is the driver of a Ray Train job on `ray_address`, checkpoints in `ray_storage`)."""

    kind: str = "local"
    ray_address: str | None = None
    ray_storage: str | None = None

    def check(self) -> None:
        if self.kind not in ("local", "ray"):
            raise UsageError(f"--executor {self.kind!r}: give local or ray")
        if self.kind == "ray" and not ray_available():
            raise UsageError(f"--executor ray: {RAY_MISSING}")
        if self.kind == "local" and (self.ray_address or self.ray_storage):
            raise UsageError("--ray-address and --ray-storage need --executor ray")

    def train_flags(self, hp: dict[str, Any]) -> list[str]:
        """The `tunesmith train` flags that place a job's training (its n_workers, gpus_per_worker)."""
        n = int(hp.get("n_workers") or 1)
        if self.kind == "local":
            return ["--nproc", str(n)] if n > 1 else []
        flags = ["--ray-address", self.ray_address or "auto", "--ray-workers", str(n),
                 "--ray-gpus-per-worker", repr(float(hp.get("gpus_per_worker") or 0))]
        return flags + (["--ray-storage", self.ray_storage] if self.ray_storage else [])


@dataclass(frozen=True)
class WorkerConfig:
    poll_interval_s: float = 1.0
    """How often the worker looks for jobs, tails metrics and renews its heartbeat."""
    lease_s: float = 30.0
    """A job whose heartbeat is older than this may be claimed by another worker."""
    stop_timeout_s: float = 30.0
    """After SIGTERM, how long the trainer may take to save its checkpoint before SIGKILL."""
    save_every_steps: int | None = None
    """Checkpoint interval; default once per epoch (as hosted fine-tuning does)."""
    judge_api_key: str | None = None
    """The key reinforcement jobs' score_model and label_model graders present to this server
    (its own API key), given to the trainer in its environment, never on its command line."""
    leakage_error: bool = False
    """A training row that repeats a validation row (exactly, or as a near duplicate) fails the
    job in validating_files, instead of a warning event."""
    executor: Executor = field(default_factory=lambda: Executor())
    """Where training runs: child processes here, or a Ray Train job (jobs/ray_executor.py)."""


RUN_SNAPSHOT_DIR = "run-snapshot"
"""JOB/run-snapshot in the shared storage (--storage): what resuming the job on another machine needs."""
GRADER_FILE = "grader.json"
"""JOB/grader.json: a reinforcement job's grader, as the trainer's --grader."""


def job_dir(store: JobStore, job_id: str) -> Path:
    return store.storage_root / "jobs" / job_id


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{new_id('w')[2:10]}"


def ft_model_name(model: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<suffix>:<id>`, with a path base shortened to its last component; a job
    that continues a fine-tuned model (`ft:<base>:...`) is named after the same base."""
    if model.startswith("ft:"):
        base_name = model.split(":")[1]
    else:
        base_name = Path(model).name if ("/" in model or os.sep in model) else model
    return f"ft:{base_name}:{suffix or ''}:{job_id.split('-', 1)[-1]}"


class Worker:
    """One job at a time; `run(stop)` loops until `stop` is set."""

    def __init__(self, store: JobStore, config: WorkerConfig = WorkerConfig(), worker_id: str | None = None,
                 on_model_ready: ModelReady | None = None, log: Callable[[str], None] | None = None,
                 on_model_gone: Callable[[str], None] | None = None):
        self.store = store
        self.config = config
        self.worker_id = worker_id or default_worker_id()
        self.on_model_ready = on_model_ready
        self.on_model_gone = on_model_gone
        """Called with a model's name when it was published but its job did not succeed
        (cancelled between the publish and the status change): it must not stay served."""
        self.log = log or (lambda msg: print(f"[worker {self.worker_id}] {msg}", file=sys.stderr, flush=True))

    def run(self, stop: threading.Event) -> None:
        self.log(f"polling {self.store.url} every {self.config.poll_interval_s:g}s")
        while not stop.is_set():
            try:
                worked = self.run_once(stop)
            except Exception as exc:  # the database may be briefly unreachable; keep polling
                self.log(f"error while looking for jobs: {exc}")
                worked = False
            if not worked:
                stop.wait(self.config.poll_interval_s)

    def run_once(self, stop: threading.Event | None = None) -> bool:
        """Claim and work on one job; False when none is waiting."""
        self.store.requeue_lapsed(self.config.lease_s)
        job = self.store.claim_job(self.worker_id, self.config.lease_s)
        if job is None:
            return False
        self.log(f"claimed {job['id']} ({job['status']})")
        try:
            if job["status"] == "validating_files":
                self._validate(job)
            else:
                self._train(job, stop or threading.Event())
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc))
            self.log(f"job {job['id']} failed inside the worker:\n{detail}")
            self._fail(job["id"], "internal_error",
                       f"the worker hit an unexpected error ({type(exc).__name__}: {exc}); see the worker's log")
        finally:
            self.store.release(job["id"], self.worker_id)
        return True

    # ------------------------------------------------------------------ validating_files

    def _validate(self, job: dict[str, Any]) -> None:
        """Check both files; fail with their line-numbered problems, or queue the job."""
        n_train = 0
        try:  # a fine-tuned model's files are checked through its base's template
            base, _ = self.store.base_and_adapter(job["model"])
        except TunesmithError as exc:  # e.g. its adapter was deleted since the job was created
            self._fail(job["id"], "invalid_model", str(exc), "model")
            return
        for param, file_id in (("training_file", job["training_file"]), ("validation_file", job["validation_file"])):
            if not file_id:
                continue
            row = self.store.get_file(file_id)
            if row is None:
                self._fail(job["id"], f"invalid_{param}", f"{param} {file_id} was deleted before the job started", param)
                return
            overrides = job.get("overrides") or {}
            columns = ColumnMapping(overrides.get("input_column", "text"), overrides.get("output_column"),
                                    overrides.get("system")) if overrides.get("output_column") else None
            try:
                # Fetched from the shared storage (--storage) when this machine lacks them.
                path = self.store.local_file(row)
                against = None
                if param == "training_file" and job["validation_file"]:
                    vrow = self.store.get_file(job["validation_file"])
                    against = self.store.local_file(vrow) if vrow else None
                if job["method"]["type"] == "reinforcement":  # prompt rows, the item fields beside them
                    check = check_prompt_file(path, MIN_EXAMPLES if param == "training_file" else 1)
                else:
                    check = self._heartbeating(job["id"], check_file, path,
                                               model=base, min_examples=MIN_EXAMPLES if param == "training_file" else 1,
                                               validation=against, leakage_error=self.config.leakage_error,
                                               columns=columns)
                    if not check.ok:  # a reinforcement file given to another method: say which method takes it
                        prompts = check_prompt_file(path)
                        check = prompts if prompts.ok else check
            except TunesmithError as exc:  # e.g. the model is gone, the file cannot be read or fetched
                self._fail(job["id"], f"invalid_{param}", f"{param} {file_id}: {exc}", param)
                return
            wrong_kind = method_mismatch(check, job["method"]["type"])
            if wrong_kind:
                self._fail(job["id"], f"invalid_{param}", f"{param} {file_id} ({row['filename']}): {wrong_kind}", param)
                return
            if check.audit:
                self.store.add_event(job["id"], f"{param} {file_id}: {check.audit}",
                                     level="warn" if any(w["code"] in AUDIT_CHECKS for w in check.warnings) else "info")
            # Duplicates and leakage first: they change what the job's scores mean.
            shown = sorted(check.warnings, key=lambda w: w["code"] not in (*AUDIT_CHECKS, "duplicate_example",
                                                                          "validation_overlap"))
            for w in shown[:10]:
                self.store.add_event(job["id"], f"{param} {file_id} line {w['line']} ({w['code']}): {w['message']}",
                                     level="warn")
            if not check.ok:
                for e in check.errors[:20]:
                    self.store.add_event(job["id"], f"{param} {file_id} line {e['line']} ({e['code']}): {e['message']}",
                                         level="error", data=e)
                self._fail(job["id"], f"invalid_{param}", check.summary(f"{param} {file_id} ({row['filename']})"), param)
                return
            if param == "training_file":
                n_train = check.examples
        method = _resolve_hyperparameters(job["method"], n_train)
        hp = method[method["type"]]["hyperparameters"]
        what = {"dpo": "preference pairs", "reinforcement": "prompts"}.get(method["type"], "examples")
        shown = ("beta", "group_size", "kl_coef", "max_completion_tokens", "temperature")
        self.store.transition(
            job["id"], ["validating_files"], "queued",
            f"Files validated: {n_train} training {what}; n_epochs={hp['n_epochs']}, "
            f"batch_size={hp['batch_size']}, learning_rate_multiplier={hp['learning_rate_multiplier']}"
            + "".join(f", {k}={hp[k]}" for k in shown if k in hp),
            method=method, worker_id=None, heartbeat_at=None,
        )

    def _heartbeating(self, job_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a thread while this worker renews its lease on the job every
        poll interval (validating a large file through a model can outlast the lease, and
        another worker would then take the job over)."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised in the worker's thread below
                result["error"] = exc

        thread = threading.Thread(target=run, name=f"validate-{job_id}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.config.poll_interval_s)
            if thread.is_alive():
                self.store.heartbeat(job_id, self.worker_id)
        if "error" in result:
            raise result["error"]
        return result["value"]

    # ------------------------------------------------------------------ training

    def _train(self, job: dict[str, Any], stop: threading.Event) -> None:
        job_id = job["id"]
        if job["status"] == "queued":
            message = "Fine-tuning job resumed" if job["started_at"] else "Fine-tuning job started"
            _, started = self.store.transition(job_id, ["queued"], "running", message,
                                               started_at=job["started_at"] or int(time.time()))
            if not started:
                return
        root = job_dir(self.store, job_id)
        root.mkdir(parents=True, exist_ok=True)
        run_dir = root / "run"
        lock_fd = self._wait_for_lock(root / "lock", job_id)
        if lock_fd is None:
            return
        seen_ckpts: set[int] = set()
        warned: set[str] = set()  # trackers already reported as failed (one warning event each)
        evaluation = None
        try:
            cmd = self._train_command(job, run_dir)
            self.store.add_event(job_id, "Resuming from the last checkpoint" if "--resume" in cmd
                                 else "Training started")
            # A job taken over from a lost worker already has events up to some step.
            tail = MetricsTail(run_dir / TRAIN_METRICS_FILE, last_step=self.store.last_metrics_step(job_id))
            outcome, rc = self._run_child(job_id, cmd, root / "train.log", lock_fd, stop,
                                          tick=lambda: self._publish_progress(job, run_dir, tail, seen_ckpts, warned),
                                          eta=lambda: tail.eta(run_dir))
            if outcome == "finished" and rc != 0:
                self._fail(job_id, "training_failed", last_error(root / "train.log", rc))
                return
            # A reinforcement job measured its held-out reward while training (metrics events); a
            # sweep trial judged on its validation loss has it already, and every trial would
            # evaluate the same base model again.
            if outcome == "finished" and job["validation_file"] and job["method"]["type"] != "reinforcement" \
                    and (job["metadata"] or {}).get("sweep_objective") != "valid_loss":
                outcome, evaluation = self._evaluate(job, run_dir, root, lock_fd, stop)
        finally:
            os.close(lock_fd)
        if outcome == "finished":
            self._finish(job, run_dir, evaluation)
        else:
            self._stopped(job_id, outcome, seen_ckpts)

    def _stopped(self, job_id: str, outcome: str, seen_ckpts: set[int]) -> None:
        """Record why the child stopped before the end (cancel, pause, shutdown, takeover)."""
        if outcome == "lost":
            self.log(f"{job_id}: another worker took the job over; child stopped")
            return
        last = max(seen_ckpts) if seen_ckpts else None
        kept = f"; checkpoint step {last} kept" if last else "; no checkpoint had been written yet"
        if outcome == "cancelled":
            self.store.add_event(job_id, f"Training stopped{kept}")
        elif outcome == "paused":
            self.store.add_event(job_id, f"Training paused{kept}; resume continues from it")
        elif outcome == "requeued":
            self.store.transition(job_id, ["running"], "queued", f"Worker stopping; job queued again{kept}")

    def _evaluate(self, job: dict[str, Any], run_dir: Path, root: Path, lock_fd: int,
                  stop: threading.Event) -> tuple[str, str | None]:
        """Base vs tuned on the validation file; returns (outcome, result file id or None)."""

        job_id = job["id"]
        valid = self.store.get_file(job["validation_file"])
        out = root / "evaluation"
        shutil.rmtree(out, ignore_errors=True)
        self.store.add_event(job_id, "Evaluating the base and the tuned model on the validation file")
        base = read_run_json(run_dir)["config"]["model"]  # what was trained on
        cmd = [sys.executable, "-m", "tunesmith.jobs.evaluation_stage", "--model", base,
               "--adapter", str(run_dir / ADAPTER_DIR), "--data", str(self.store.local_file(valid)),
               "--out", str(out), "--base-cache", str(self.store.storage_root / BASE_EVALUATIONS)]
        outcome, rc = self._run_child(job_id, cmd, root / "evaluation.log", lock_fd, stop,
                                      tick=lambda: None, eta=lambda: None)
        if outcome != "finished":
            return outcome, None
        if rc != 0 or not (out / SUMMARY_FILE).is_file():
            self.store.add_event(job_id, f"Evaluation failed, the model is kept: "
                                         f"{last_error(root / 'evaluation.log', rc)}", level="warn")
            return outcome, None
        summary = json.loads((out / SUMMARY_FILE).read_text())
        self.store.add_event(job_id, summary_sentence(summary), data=summary)
        try:
            return outcome, self._store_result_file(job_id, "evaluation.json", (out / SUMMARY_FILE).read_bytes())
        except StorageError as exc:
            self.store.add_event(job_id, f"The evaluation's result file could not be stored: {exc}", level="warn")
            return outcome, None

    def _wait_for_lock(self, path: Path, job_id: str) -> int | None:
        """Wait (heartbeating) until no earlier trainer of this job still runs."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if self.store.heartbeat(job_id, self.worker_id) is None:
                    os.close(fd)
                    return None
                time.sleep(self.config.poll_interval_s)

    def _train_command(self, job: dict[str, Any], run_dir: Path) -> list[str]:
        kind = job["method"]["type"]
        hp = job["method"][kind]["hyperparameters"]
        cmd = [sys.executable, "-m", "tunesmith", "train"]
        if (run_dir / RUN_FILE).is_file() and has_checkpoint(run_dir):
            return cmd + ["--resume", str(run_dir)] + self.config.executor.train_flags(hp)
        # Another machine's worker trained it before (--storage): continue its last checkpoint,
        # given every flag again, since the run's own paths were that machine's.
        place = ["--resume", str(run_dir)] if self._fetch_run_snapshot(job["id"], run_dir) else ["--out", str(run_dir)]
        if place[0] == "--out" and run_dir.exists():  # started but never checkpointed: start over
            shutil.rmtree(run_dir)
        train_file = self.store.get_file(job["training_file"])
        base, init_adapter = self.store.base_and_adapter(job["model"])
        cmd += ["--model", base, "--data", str(self.store.local_file(train_file)),
                *place, "--seed", str(job["seed"]),
                "--epochs", str(hp["n_epochs"]), "--batch-size", str(hp["batch_size"])]
        if job["validation_file"]:
            valid_file = self.store.get_file(job["validation_file"])
            cmd += ["--validation", str(self.store.local_file(valid_file))]
        if kind == "dpo":
            cmd += ["--method", "dpo", "--beta", repr(float(hp["beta"]))]
        if kind == "reinforcement":
            grader = run_dir.parent / GRADER_FILE
            write_atomically(grader, json.dumps(job["method"][kind]["grader"]) + "\n")
            cmd += ["--method", "reinforcement", "--grader", str(grader), "--group-size", str(hp["group_size"]),
                    "--kl-coef", repr(float(hp["kl_coef"])), "--temperature", repr(float(hp["temperature"])),
                    "--max-completion-tokens", str(hp["max_completion_tokens"]),
                    "--eval-samples", str(hp["eval_samples"])]
            if job["method"][kind].get("judge_base_url"):
                cmd += ["--judge-base-url", job["method"][kind]["judge_base_url"]]
        if init_adapter is not None:  # the job continues an earlier job's fine-tuned model
            cmd += ["--init-adapter", str(init_adapter)]
        if hp["learning_rate_multiplier"] != 1.0:
            cmd += ["--learning-rate", repr(_default_learning_rate(kind) * float(hp["learning_rate_multiplier"]))]
        cmd += _tracking_flags(job) + self.config.executor.train_flags(hp)
        every = self.config.save_every_steps or hp.get("steps_per_epoch")
        if every:
            cmd += ["--save-every-steps", str(every)]
        if job["validation_file"] and (hp.get("eval_interval") or every):  # every checkpoint with validation metrics
            cmd += ["--eval-every-steps", str(hp.get("eval_interval") or every)]
        return _with_overrides(cmd, job.get("overrides"), run_dir.parent)

    def _run_child(self, job_id: str, cmd: list[str], log_path: Path, lock_fd: int, stop: threading.Event,
                   tick: Callable[[], None], eta: Callable[[], int | None]) -> tuple[str, int | None]:
        """Run a child until it exits or the job is cancelled, paused, lost or the worker stops.

        Returns (outcome, exit code): outcome "finished" (the child exited by itself),
        "cancelled", "paused", "lost" (another worker holds the job) or "requeued".
        `tick` runs every poll (and once after the child ends) to publish its progress.
        """
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if self.config.judge_api_key:  # a reinforcement job's judges ask this server
            env["OPENAI_API_KEY"] = self.config.judge_api_key
        with open(log_path, "ab") as log_fh:
            log_fh.write(f"\n$ {' '.join(cmd)}\n".encode())
            log_fh.flush()
            # pass_fds: the child holds the job's lock until it has exited, even if we die first.
            argv, preexec = _with_parent_death_signal(cmd)
            child = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, pass_fds=(lock_fd,), preexec_fn=preexec, start_new_session=True)
        self.log(f"{job_id}: child pid {child.pid}: {' '.join(cmd[2:4])}")
        reason = "finished"
        while True:
            try:
                child.wait(timeout=self.config.poll_interval_s)
            except subprocess.TimeoutExpired:
                pass
            tick()
            if child.returncode is not None:
                return reason, child.returncode
            status = self.store.heartbeat(job_id, self.worker_id, estimated_finish=eta())
            if status is None:
                reason = "lost"
                child.kill()
            elif status in ("cancelled", "paused"):
                reason = status
                self._stop_child(child)
            elif stop.is_set():
                reason = "requeued"
                self._stop_child(child)
            if reason != "finished":
                child.wait()
                tick()
                return reason, child.returncode

    def _stop_child(self, child: subprocess.Popen) -> None:
        """SIGTERM (the trainer checkpoints and exits), then SIGKILL after the timeout."""
        child.terminate()
        try:
            child.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()

    def _publish_progress(self, job: dict[str, Any], run_dir: Path, tail: MetricsTail, seen: set[int],
                          warned: set[str]) -> None:
        total, new = tail.total_steps(run_dir), False
        for row in tail.new_rows():
            step = row.get("step")
            parts = [f"Step {step}/{total}" if total else f"Step {step}"]
            if row.get("train_loss") is not None:
                parts.append(f"training loss={row['train_loss']:.4f}")
            if row.get("valid_loss") is not None:
                parts.append(f"validation loss={row['valid_loss']:.4f}")
            if row.get("token_accuracy") is not None:
                parts.append(f"validation token accuracy={row['token_accuracy']:.3f}")
            if row.get("reward_accuracy") is not None:  # a dpo job
                parts.append(f"reward accuracy={row['reward_accuracy']:.3f}, reward margin={row['reward_margin']:.4f}")
            if row.get("reward_mean") is not None:  # a reinforcement job
                parts.append(f"reward={row['reward_mean']:.4f} (std {row['reward_std']:.4f}), "
                             f"answer length={row['completion_tokens']:.1f}, grader errors={row['grader_errors']}")
            if row.get("valid_reward") is not None:
                parts.append(f"held-out reward={row['valid_reward']:.4f}")
            if row.get("valid_reward_accuracy") is not None:
                parts.append(f"validation reward accuracy={row['valid_reward_accuracy']:.3f}")
            # The trainer's token_accuracy is measured on the validation set, with valid_loss.
            data = {"step": step, "total_steps": total, "train_loss": row.get("train_loss"),
                    "valid_loss": row.get("valid_loss"), "valid_mean_token_accuracy": row.get("token_accuracy"),
                    "epoch": row.get("epoch"), "learning_rate": row.get("lr"), "tokens_per_s": row.get("tokens_per_s")}
            data.update({k: row[k] for k in DPO_METRIC_KEYS + RFT_METRIC_KEYS if row.get(k) is not None})
            self.store.add_event(job["id"], ", ".join(parts), type="metrics", data=data)
        for tracker, message in read_tracking_file(run_dir).get("failed", {}).items():
            if tracker not in warned:
                warned.add(tracker)
                self.store.add_event(job["id"], f"Tracker {message}", level="warn",
                                     data={"tracker": tracker})
        for step, path in list_checkpoints(run_dir, require=(ADAPTER_CONFIG_FILE, STATE_FILE)):
            if step in seen:
                continue
            seen.add(step)
            self._record_checkpoint(job, path, step, tail)
            new = True
        if new:
            self._publish_run_snapshot(job["id"], run_dir)

    def _publish_run_snapshot(self, job_id: str, run_dir: Path) -> None:
        """With --storage: the run cut down to its newest and best checkpoints (training state
        included), as JOB/run-snapshot in the storage, so that a worker on another machine
        resumes the job (paused, or its worker lost) from there instead of from step 0."""
        if self.store.shared is None:
            return
        staging = job_dir(self.store, job_id) / RUN_SNAPSHOT_DIR
        shutil.rmtree(staging, ignore_errors=True)
        try:
            snapshot_run(run_dir, staging, final=False)
            self.store.publish_dir(staging.relative_to(self.store.storage_root))
        except (OSError, StorageError) as exc:  # e.g. a checkpoint pruned while copied: the next one goes
            self.log(f"{job_id}: could not publish the run's snapshot: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_run_snapshot(self, job_id: str, run_dir: Path) -> bool:
        """Lay the storage's JOB/run-snapshot out as `run_dir`; False when there is none."""
        if self.store.shared is None:
            return False
        rel = job_dir(self.store, job_id).relative_to(self.store.storage_root) / RUN_SNAPSHOT_DIR
        shutil.rmtree(self.store.storage_root / rel, ignore_errors=True)  # an earlier fetch's copy is stale
        try:
            fetched = self.store.shared.fetch_dir(rel)
        except StorageError as exc:
            self.store.add_event(job_id, f"Could not fetch the run's last checkpoint from the shared storage ({exc}); "
                                 "training starts over", level="warn")
            return False
        if fetched is None or not has_checkpoint(fetched):
            return False
        shutil.rmtree(run_dir, ignore_errors=True)
        os.rename(fetched, run_dir)
        return True

    def _record_checkpoint(self, job: dict[str, Any], path: Path, step: int, tail: MetricsTail) -> None:
        # Keep the adapter weights (not the optimizer state): the trainer prunes old checkpoints,
        # but a published checkpoint stays addressable as a model. The job's copies are laid
        # out as the run's: JOB/checkpoints/step-000120/.
        dest = job_dir(self.store, job["id"]) / CHECKPOINTS_DIR / path.name
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                for name in ADAPTER_FILES:
                    if (path / name).is_file():
                        shutil.copy2(path / name, tmp / name)
                os.replace(tmp, dest)
            except FileNotFoundError:  # pruned by the trainer while we copied
                shutil.rmtree(tmp, ignore_errors=True)
                return
            except OSError as exc:  # e.g. the disk is full: point at the trainer's copy instead
                shutil.rmtree(tmp, ignore_errors=True)
                self.store.add_event(job["id"], f"Could not keep a copy of checkpoint step {step} ({exc.strerror}); "
                                     "it may be pruned by later checkpoints", level="warn")
                dest = path
        m = tail.at_step(step)
        metrics = {
            "step": float(step),
            "train_loss": m.get("train_loss"),
            "train_mean_token_accuracy": None,  # not measured by the trainer
            # The trainer evaluates on the whole validation file, so "valid" is also "full_valid".
            "valid_loss": m.get("valid_loss"),
            "valid_mean_token_accuracy": m.get("token_accuracy"),
            "full_valid_loss": m.get("valid_loss"),
            "full_valid_mean_token_accuracy": m.get("token_accuracy"),
        }
        try:  # before the row: an API node that sees the row can fetch the adapter
            self.store.publish_dir(dest.relative_to(self.store.storage_root))
        except StorageError as exc:
            self.store.add_event(job["id"], f"Checkpoint step {step} is not in the shared storage, so other machines "
                                 f"cannot serve it: {exc}", level="warn")
        name = ft_model_name(job["model"], job["suffix"], job["id"]) + f":ckpt-step-{step}"
        added = self.store.add_checkpoint({
            "id": new_id("ftckpt"), "job_id": job["id"], "created_at": int(time.time()), "step": step,
            "metrics": metrics, "fine_tuned_model_checkpoint": name, "path": str(dest.relative_to(self.store.storage_root)),
        })
        if added:
            self.store.add_event(job["id"], f"Checkpoint created at step {step}", data={"step": step, "model": name})

    # ------------------------------------------------------------------ finishing

    def _finish(self, job: dict[str, Any], run_dir: Path, evaluation: str | None = None) -> None:
        job_id = job["id"]
        run = read_run_json(run_dir)
        adapter = run_dir / ADAPTER_DIR
        try:  # before "succeeded": an API node that sees it can fetch them (--storage)
            self.store.publish_dir(adapter.relative_to(self.store.storage_root))
            result_files = [self._metrics_file(job_id, run_dir)] + ([evaluation] if evaluation else [])
        except StorageError as exc:
            self._fail(job_id, "publish_failed", f"the model was trained, but could not be put into the shared storage "
                       f"that the API node reads ({exc}); its adapter is at {adapter} on worker {self.worker_id}")
            return
        name = ft_model_name(job["model"], job["suffix"], job_id)
        files_hashes = {}
        for fid in (job["training_file"], job["validation_file"]):
            row = self.store.get_file(fid) if fid else None
            if row:
                files_hashes[fid] = row["sha256"]
        lineage = {
            "base_model": run.get("base_model"),
            "files": files_hashes,
            "config": run.get("config"),
            "resolved": run.get("resolved"),
            "metrics": run.get("metrics"),
            "adapter": str(adapter.relative_to(self.store.storage_root)),
        }
        init_adapter = run["config"].get("init_adapter")
        if init_adapter:  # the fine-tuned model this job continued
            lineage["continued_from"] = {"model": job["model"],
                                         "adapter": str(Path(init_adapter).relative_to(self.store.storage_root))}
        eval_file = job_dir(self.store, job_id) / "evaluation" / "evaluation.json"
        if evaluation and eval_file.is_file():
            lineage["evaluation"] = json.loads(eval_file.read_text())
        if self.on_model_ready:  # served before anyone can see "succeeded"
            self.on_model_ready(name, adapter)
        _, done = self.store.transition(
            job_id, ["running"], "succeeded", f"New fine-tuned model created: {name}",
            fine_tuned_model=name, finished_at=int(time.time()), trained_tokens=trained_tokens(run),
            result_files=result_files, lineage=lineage, estimated_finish=None,
        )
        if done:
            self.store.add_event(job_id, "The job has successfully completed")
        elif self.on_model_ready and self.on_model_gone:  # cancelled meanwhile: no model of it is served
            self.on_model_gone(name)

    def _metrics_file(self, job_id: str, run_dir: Path) -> str:
        return self._store_result_file(job_id, "step_metrics.csv", metrics_csv(run_dir))

    def _store_result_file(self, job_id: str, filename: str, content: bytes) -> str:
        import hashlib

        file_id = new_id("file")
        rel = Path("files") / f"{file_id}{Path(filename).suffix}"
        dest = self.store.storage_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(dest, content)
        self.store.publish_file(rel)
        self.store.add_file({
            "id": file_id, "created_at": int(time.time()), "bytes": len(content), "filename": filename,
            "purpose": "fine-tune-results", "status": "processed", "status_details": None,
            "sha256": hashlib.sha256(content).hexdigest(), "path": str(rel), "validation": None,
        })
        return file_id

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.store.transition(
            job_id, ["validating_files", "queued", "running"], "failed", f"Job failed: {message}",
            error={"code": code, "message": message, "param": param}, finished_at=int(time.time()),
            estimated_finish=None,
        )


OVERRIDES_FILE = "overrides.yaml"
"""In the job's folder: the TrainConfig settings the job sets itself (a sweep trial's), as `train -c` reads them."""


def _with_overrides(cmd: list[str], overrides: dict[str, Any] | None, job_root: Path) -> list[str]:
    """`cmd` with the job's own TrainConfig settings: written to JOB/overrides.yaml and passed
    with -c, and every flag of the worker's that sets one of those keys dropped (flags win
    over the file, and the job's own value must)."""
    if not overrides:
        return cmd
    import yaml

    write_atomically(job_root / OVERRIDES_FILE, yaml.safe_dump(overrides, sort_keys=False))
    head, kept, i = cmd[:4], [], 4  # python -m tunesmith train
    while i < len(cmd):
        flag = cmd[i]
        takes_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
        if flag[2:].replace("-", "_") not in overrides:
            kept += cmd[i:i + 1 + takes_value]
        i += 1 + takes_value
    return head + ["-c", str(job_root / OVERRIDES_FILE)] + kept


DEFAULT_TAGS = ("tunesmith/finetune", "tunesmith/{base}", "tunesmith/{job_id}")
"""Tags every tracker's run of a job carries (OpenAI's openai/finetune, openai/<base>, openai/<job>)."""


def _tracking_flags(job: dict[str, Any]) -> list[str]:
    """`tunesmith train` flags for the job's integrations (checked when the job was created)."""
    integrations = job.get("integrations") or []
    if not integrations:
        return []
    settings = [{**(i.get(i["type"]) or {})} for i in integrations]
    project = next((s["project"] for s in settings if s.get("project")), None)
    name = next((s["name"] for s in settings if s.get("name")), None) or job["id"]
    base = job["model"].split(":")[1] if job["model"].startswith("ft:") else Path(job["model"]).name
    tags = [t.format(base=base, job_id=job["id"]) for t in DEFAULT_TAGS]
    for s in settings:
        tags += [t for t in s.get("tags") or [] if t not in tags]
    flags = ["--report-to", ",".join(i["type"] for i in integrations), "--run-name", name,
             "--tracking-tags", ",".join(t.replace(",", " ") for t in tags)]
    if project:
        flags += ["--tracking-project", project]
    for s in settings:
        if s.get("entity"):
            flags += ["--wandb-entity", s["entity"]]
        if s.get("tracking_uri"):
            flags += ["--mlflow-tracking-uri", s["tracking_uri"]]
    return flags


def _resolve_hyperparameters(method: dict[str, Any], n_examples: int) -> dict[str, Any]:
    """Replace every "auto" with the value training will use (known once the data is read)."""

    kind = method["type"]
    hp = dict(method[kind]["hyperparameters"])
    if hp.get("n_epochs", "auto") == "auto":
        hp["n_epochs"] = 1 if kind == "reinforcement" else auto_epochs(n_examples)
    if hp.get("batch_size", "auto") == "auto":
        hp["batch_size"] = max(1, min(16, n_examples // 10 or 1))
    if hp.get("learning_rate_multiplier", "auto") == "auto":
        hp["learning_rate_multiplier"] = 1.0
    if kind == "dpo" and hp.get("beta", "auto") == "auto":
        hp["beta"] = DEFAULT_BETA
    if kind == "reinforcement":  # OpenAI's compute_multiplier scales the answers sampled per prompt
        if hp.get("compute_multiplier", "auto") == "auto":
            hp["compute_multiplier"] = 1.0
        if hp.get("group_size", "auto") == "auto":
            hp["group_size"] = max(2, round(DEFAULT_GROUP_SIZE * float(hp["compute_multiplier"])))
        for key in ("kl_coef", "max_completion_tokens", "temperature", "eval_samples"):
            if hp.get(key, "auto") == "auto":
                hp[key] = RL_DEFAULTS[key]
        if hp.get("eval_interval", "auto") == "auto":
            hp["eval_interval"] = max(1, -(-n_examples // int(hp["batch_size"])))
    hp["steps_per_epoch"] = max(1, -(-n_examples // int(hp["batch_size"])))
    return {**method, kind: {**method[kind], "hyperparameters": hp}}


def _default_learning_rate(kind: str = "supervised") -> float:
    """The learning rate `tunesmith train` uses by default for the job's method (multiplier 1.0):
    LoRA for supervised jobs, LoRA DPO for dpo jobs."""
    return DEFAULT_LEARNING_RATE[kind if kind in ("dpo", "reinforcement") else "lora"]


_PR_SET_PDEATHSIG = 1


def _with_parent_death_signal(cmd: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """Make the child get SIGTERM when the worker dies (Linux), so it checkpoints and exits.

    util-linux's `setpriv --pdeathsig` does it without running Python between fork and
    exec (unsafe in a process with threads, like the server); prctl from a preexec
    function is the fallback where setpriv is missing.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *cmd], None
    return cmd, _die_with_parent


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
