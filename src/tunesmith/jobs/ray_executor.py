"""Train one run on a Ray cluster: the same `train()` in each Ray Train worker, the run
directory mirrored back here as it grows.

    tunesmith train --data train.jsonl --out runs/r1 --ray-address auto --ray-workers 2
    tunesmith worker --executor ray --ray-address HEAD:6379      # jobs: n_workers, gpus_per_worker

This process is the Ray driver. It starts a `TorchTrainer` whose workers (Ray set up
torch.distributed: gloo on CPU, nccl on GPU) each run `train.run.train` on a run
directory of their own, in a temporary folder of their node:

- **data** travels with the trainer's config (the files' bytes through Ray's object store),
  so the workers need not see this machine's $TUNESMITH_HOME;
- **checkpoints**: after each save, rank 0 reports a snapshot of its run directory (run.json,
  metrics.jsonl, the newest and the best checkpoint, and at the end adapter/) with
  `ray.train.report`, which writes it under Ray's storage path (`--ray-storage`: a folder
  every node shares, or an object store URI). A worker group Ray restarts after a lost node
  (`FailureConfig(max_failures)`) and a resumed run (same name in the same storage) start
  from `ray.train.get_checkpoint()`, the last snapshot: nothing saved is lost;
- **progress**: rank 0 sends each metrics row through a Ray queue; this process appends it
  to the local metrics.jsonl and copies each reported snapshot's checkpoint into the local
  run directory, so the jobs worker tails and records them as it does for a local child.

Stopping this process (SIGTERM: cancel, pause) stops the Ray job as SIGTERM stops a local
run: the driver puts a stop message on a second Ray queue, rank 0 sees it before its next step
(`RunObserver.stop_requested`), every worker finishes that step, saves and reports a
checkpoint, and returns; the driver mirrors the checkpoint and exits. Should they not have
done so within SAVE_ON_STOP_S, the driver exits anyway, and the trainer's actors, which it
owns, end with it. ray is imported inside the functions: the default install has none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.fileio import write_atomically
from tunesmith.jobs.run_snapshot import RAY_FILE, snapshot_run
from tunesmith.models.registry import resolve_model
from tunesmith.runs import (
    ADAPTER_DIR,
    BEST_FILE,
    CHECKPOINTS_DIR,
    RUN_FILE,
    TRACKING_FILE,
    TRAIN_METRICS_FILE,
    checkpoint_dir,
    list_checkpoints,
)
from tunesmith.train import checkpoint as ck
from tunesmith.train.config import TrainConfig
from tunesmith.train.progress import truncate_metrics
from tunesmith.train.run import default_out, train

RAY_MISSING = "the Ray executor needs Ray Train: pip install 'tunesmith[ray]'"


@dataclass(frozen=True)
class RayPlacement:
    """Where and on how much a run trains on Ray."""

    address: str | None = "auto"
    """The cluster (HOST:6379, ray://HOST:10001, auto: the one `ray start` began on this machine)."""
    n_workers: int = 1
    """Ray Train workers, one process each (data parallel)."""
    gpus_per_worker: float = 0.0
    """GPUs each worker holds; 0 trains on CPUs with gloo."""
    cpus_per_worker: float = 1.0
    storage: str | None = None
    """Ray's storage path for checkpoints; default the run directory's parent/ray."""
    max_failures: int = 3
    """Worker-group restarts (a lost node) before the run fails."""

    def check(self) -> None:
        problems = []
        if self.n_workers < 1:
            problems.append(f"--ray-workers {self.n_workers}: give 1 or more")
        if self.gpus_per_worker < 0:
            problems.append(f"--ray-gpus-per-worker {self.gpus_per_worker}: give 0 (CPU) or more")
        if problems:
            raise ConfigError("; ".join(problems))


SAVE_ON_STOP_S = 15.0
"""After SIGTERM, how long the Ray workers may take to finish their step and save (the jobs
worker sends SIGKILL after its stop_timeout_s, 30 s by default)."""
CONNECT_TIMEOUT_S = 10.0
"""How long a HOST:PORT cluster address may take to accept a TCP connection."""


def _check_reachable(address: str | None) -> None:
    """Fail at once with a sentence when a HOST:PORT (or ray://HOST:PORT) address does not
    accept a connection: Ray's own connect retries an unroutable address for minutes."""
    import socket

    target = (address or "").removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():  # auto, local, None: Ray finds the cluster itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise _no_cluster(address, f"could not connect within {CONNECT_TIMEOUT_S:.0f} s: {exc}") from None


def _no_cluster(address: str | None, why: Any) -> ConfigError:
    return ConfigError(f"--ray-address {address}: no Ray cluster answered ({why}); start one with "
                       "`ray start --head` and pass its HOST:6379, or `local` for one on this machine")


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def train_on_ray(cfg: TrainConfig, placement: RayPlacement) -> None:
    """Run `cfg` as a Ray Train job and leave its run directory here, as `train(cfg)` would."""
    placement.check()
    if not ray_available():
        raise ConfigError(RAY_MISSING)
    out = Path(cfg.resume or cfg.out or default_out(cfg)).resolve()
    # What every worker would fail on is said here once: Ray retries a failed worker group
    # max_failures times, which helps a lost node, not a wrong path.
    if Path(cfg.model).exists():  # a folder: the same absolute path on every node (shared storage)
        cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})
    resolve_model(cfg.model)
    run = _ray_run(out, placement, resuming=cfg.resume is not None)
    files = {"data": _file_bytes(cfg.data)}
    if cfg.validation:
        files["validation"] = _file_bytes(cfg.validation)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    _check_reachable(placement.address)
    try:
        ray.init(address=placement.address, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": _passed_env()})
    except ConnectionError as exc:
        raise _no_cluster(placement.address, exc) from None
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / RAY_FILE, json.dumps(run, indent=2) + "\n")
    mirror = _Mirror(out, cfg, run)
    queue = Queue(actor_options={"num_cpus": 0})
    control = Queue(maxsize=1, actor_options={"num_cpus": 0})  # the driver's stop message to rank 0
    resources = {"CPU": placement.cpus_per_worker, **({"GPU": placement.gpus_per_worker} if placement.gpus_per_worker else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.to_json(), "files": files, "queue": queue, "control": control},
        scaling_config=ScalingConfig(num_workers=placement.n_workers, use_gpu=placement.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run["name"], storage_path=run["storage"],
                             failure_config=FailureConfig(max_failures=placement.max_failures),
                             # the newest snapshot holds the best checkpoint too: older ones are never read
                             checkpoint_config=CheckpointConfig(num_to_keep=3)),
    )
    stop = threading.Event()
    relay = threading.Thread(target=mirror.follow, args=(queue, stop), daemon=True)
    relay.start()
    # SIGTERM (the jobs worker's cancel and pause, `kill`) asks the workers to save and return;
    # fit() then returns here. Past SAVE_ON_STOP_S this process exits anyway, and Ray ends the
    # trainer's controller and workers with their owner (an exception raised from the handler
    # would not get out of Ray's blocking wait, so the handler only starts a thread).
    stopping = _Stopping(out, stop, relay)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.begin(control))
    try:
        trainer.fit()
    except Exception as exc:
        if type(exc).__name__ in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise TunesmithError(f"the Ray Train job failed: {exc}") from None
        raise
    finally:
        stop.set()
        relay.join(timeout=30)
        ray.shutdown()
    if stopping.started.is_set():  # the workers saved and returned: their checkpoint is mirrored
        stopping.exit()
    mirror.finish()


_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")


def _passed_env() -> dict[str, str]:
    """The variables the workers need from here; PYTHONPATH made absolute (Ray's workers start
    in a folder of their own). Not TUNESMITH_HOME: a node finds a registry model in its own
    (the one `ray start` ran with), which need not be this machine's."""
    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env


class _Stopping:
    """SIGTERM on the driver: a stop message to rank 0, then exit once the workers have saved
    (fit() returned) or SAVE_ON_STOP_S has passed, whichever comes first."""

    def __init__(self, out: Path, stop: threading.Event, relay: threading.Thread) -> None:
        self.out, self.stop, self.relay = out, stop, relay
        self.started = threading.Event()
        self.lock = threading.Lock()

    def begin(self, control: Any) -> None:
        if self.started.is_set():  # a second SIGTERM: stop waiting
            threading.Thread(target=self.exit, daemon=True).start()
            return
        self.started.set()
        threading.Thread(target=self._ask_and_wait, args=(control,), daemon=True).start()

    def _ask_and_wait(self, control: Any) -> None:
        print(f"stopping: asking the Ray workers to save at the end of their step (at most {SAVE_ON_STOP_S:.0f} s)",
              file=sys.stderr, flush=True)
        try:
            control.put("stop", timeout=5)
        except Exception as exc:  # the queue's actor is gone: nothing will save
            print(f"warning: could not ask the Ray workers to save: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(SAVE_ON_STOP_S)
        self.exit()

    def exit(self) -> None:
        with self.lock:  # the waiting thread and the main thread (fit() returned) may both get here
            self.stop.set()
            self.relay.join(timeout=10)  # the rows and the snapshot already queued
            last = ck.latest_checkpoint(self.out)
            print("error: stopped by SIGTERM; "
                  + (f"checkpoint {last.name} saved" if last else "no checkpoint was saved")
                  + f"; continue with: tunesmith train --resume {self.out} --ray-address ADDRESS",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)


def _ray_run(out: Path, placement: RayPlacement, resuming: bool) -> dict[str, str]:
    """The Ray run's storage and name: those of the first attempt when resuming (Ray restores
    its last checkpoint from them), else new ones."""
    if resuming:
        if not (out / RAY_FILE).is_file():
            raise ConfigError(f"--resume {out}: the run was not trained on Ray (no {RAY_FILE}); "
                              "resume it without --ray-address")
        return json.loads((out / RAY_FILE).read_text())
    if ck.latest_checkpoint(out) is not None:
        raise ConfigError(f"run directory {out} already holds checkpoints; continue it with --resume {out} "
                          "or pick another --out")
    storage = placement.storage or str(out.parent / "ray")
    digest = hashlib.sha1(f"{out}:{time.time_ns()}".encode()).hexdigest()[:8]
    return {"storage": storage, "name": f"{out.parent.name}-{out.name}-{digest}"}


def _file_bytes(path: Path) -> tuple[str, bytes]:
    try:
        return Path(path).name, Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--data/--validation '{path}': {exc.strerror}") from None


# ---------------------------------------------------------------------------- on each Ray worker

def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its own run directory, restored from Ray's last checkpoint if any."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    local = Path(tempfile.mkdtemp(prefix="tunesmith-ray-"))
    try:
        paths = {}
        for key, (name, content) in config["files"].items():
            (local / "data").mkdir(exist_ok=True)
            paths[key] = local / "data" / f"{key}-{name}"
            paths[key].write_bytes(content)
        out = local / "run"
        restored = ray.train.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(out))
        cfg = TrainConfig.model_validate({**config["cfg"], **{k: str(v) for k, v in paths.items()}, "out": str(out),
                                          "resume": str(out) if restored is not None else None})
        try:
            train(cfg, progress=False, observer=_Reporter(rank, config["queue"], local / "snapshots", config["control"]))
        except ck.TrainingInterrupted as exc:  # the driver's stop: saved and reported; a return, not a failure to retry
            print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class _Reporter:
    """train()'s observer on a Ray worker: rows to the driver's queue, checkpoints to Ray."""

    def __init__(self, rank: int, queue: Any, staging: Path, control: Any) -> None:
        self.rank, self.queue, self.staging, self.control = rank, queue, staging, control

    def stop_requested(self) -> bool:
        # Rank 0 only (train() asks no other): its stop reaches the others with the step's all-reduce.
        return not self.control.empty()

    def started(self, out: Path, step: int) -> None:
        self.queue.put(("started", step, (out / RUN_FILE).read_text()))

    def logged(self, row: dict[str, Any]) -> None:
        self.queue.put(("row", row))

    def saved(self, out: Path, step: int, final: bool) -> None:
        import ray.train

        name = f"{'final' if final else 'step'}-{step:06d}"
        snapshot = snapshot_run(out, self.staging / name, final) if self.rank == 0 else None
        # Every worker calls report (a barrier); only rank 0 has files to persist.
        ray.train.report({"step": step, "final": final},
                         checkpoint=ray.train.Checkpoint.from_directory(str(snapshot)) if snapshot else None,
                         checkpoint_dir_name=name)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
            self.queue.put(("saved", step, name, final))


# ---------------------------------------------------------------------------- back on the driver

class _Mirror:
    """The local run directory, kept as a local `train()` would leave it."""

    def __init__(self, out: Path, cfg: TrainConfig, run: dict[str, str]) -> None:
        self.out, self.cfg, self.run = out, cfg, run
        self.final: str | None = None

    def follow(self, queue: Any, stop: threading.Event) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                message = queue.get(timeout=0.5)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (shutdown)
                return
            try:
                self.take(message)
            except OSError as exc:  # e.g. a full disk here: the run goes on, its snapshots stay in Ray's storage
                print(f"warning: could not mirror the run into {self.out}: {exc}", file=sys.stderr)

    def take(self, message: tuple) -> None:
        kind = message[0]
        if kind == "started":  # a fresh start or a restart from a checkpoint: rows after it are redone
            _, step, run_json = message
            self._write_run_json(json.loads(run_json))
            truncate_metrics(self.out / TRAIN_METRICS_FILE, step)
        elif kind == "row":
            with open(self.out / TRAIN_METRICS_FILE, "a") as fh:
                fh.write(json.dumps(message[1]) + "\n")
        elif kind == "saved":
            _, step, name, final = message
            try:
                self._copy_snapshot(name, final)
            except (OSError, ValueError) as exc:  # pruned by Ray's num_to_keep before we got to it
                print(f"warning: could not copy Ray checkpoint {name}: {exc}", file=sys.stderr)
                return
            if final:
                self.final = name

    def finish(self) -> None:
        if self.final is None:
            raise TunesmithError("the Ray Train job ended without its final checkpoint; see the workers' log above")

    def _copy_snapshot(self, name: str, final: bool) -> None:
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="tunesmith-ray-") as tmp:
            Checkpoint(path=f"{self.run['storage'].rstrip('/')}/{self.run['name']}/{name}").to_directory(tmp)
            snap = Path(tmp)
            for step, path in list_checkpoints(snap):
                dest = checkpoint_dir(self.out, step)
                if not dest.exists():  # complete once renamed into place, as the trainer writes them
                    partial = dest.with_name(dest.name + ".tmp")
                    shutil.rmtree(partial, ignore_errors=True)
                    shutil.copytree(path, partial)
                    os.replace(partial, dest)
            for name_ in (f"{CHECKPOINTS_DIR}/{BEST_FILE}", TRACKING_FILE):
                if (snap / name_).is_file():
                    write_atomically(self.out / name_, (snap / name_).read_text())
            if (snap / RUN_FILE).is_file():
                self._write_run_json(json.loads((snap / RUN_FILE).read_text()))
            if final:
                shutil.rmtree(self.out / ADAPTER_DIR, ignore_errors=True)
                shutil.copytree(snap / ADAPTER_DIR, self.out / ADAPTER_DIR)
        ck.prune_checkpoints(self.out)

    def _write_run_json(self, info: dict[str, Any]) -> None:
        """The worker's run.json, with this machine's paths (the workers' are temporary)."""
        config = info.get("config", {})
        config.update({"out": str(self.out), "data": str(self.cfg.data),
                       "validation": str(self.cfg.validation) if self.cfg.validation else None})
        config.pop("resume", None)
        if "adapter" in info.get("metrics", {}):
            info["metrics"]["adapter"] = str(self.out / ADAPTER_DIR)
        info.setdefault("resolved", {})["executor"] = {"ray": {**self.run}}
        write_atomically(self.out / RUN_FILE, json.dumps(info, indent=2, default=str) + "\n")
