"""OpenAI's files and fine-tuning jobs endpoints, backed by the jobs store and workers.

`JobsService(store, ...)` owns the router (`service.router`, mounted next to the inference
routes), the worker threads (`workers=N`) and the publisher that puts every succeeded
job's adapter (and its checkpoints) into the inference engine, so a finished model answers
`/v1/chat/completions` at once, also when another machine's worker trained it. The
router's lifespan starts and stops them with the app.

    curl -F purpose=fine-tune -F file=@train.jsonl localhost:8000/v1/files
    curl localhost:8000/v1/fine_tuning/jobs -H 'content-type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "training_file": "file-..."}'
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse

from tunesmith.data.validate import validate_data
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.generate.engine import ADAPTER_NAME
from tunesmith.graders.run import validate_grader
from tunesmith.graders.types import GraderError, parse_grader
from tunesmith.jobs.shared_storage import StorageError
from tunesmith.jobs.store import ACTIVE, JobStore, new_id, open_store
from tunesmith.jobs.sweep import load_sweep_results, open_sweep_storage
from tunesmith.jobs.validation import audit_problems, check_file
from tunesmith.jobs.worker import Executor, Worker, WorkerConfig, ft_model_name
from tunesmith.models.registry import REGISTRY, resolve_model
from tunesmith.serve.errors import APIError, KeyGate, add_error_handlers, require_api_key
from tunesmith.serve.graders_api import GraderSlots, own_endpoint, refuse_python
from tunesmith.serve.jobs_protocol import (
    DpoHyperparameters,
    Hyperparameters,
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page,
)
from tunesmith.serve.limits import MAX_BODY_BYTES, BodyLimit, confined_path, looks_like_path
from tunesmith.serve.uploads import receive_upload
from tunesmith.tracking.base import missing_trackers

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
PUBLISHED_CHECKPOINTS = 3
"""Checkpoints per job that are loaded as models (the last ones, as hosted APIs keep)."""
SWEEP_CACHE_S = 2.0
"""How long GET /v1/sweeps/{name} reuses a sweep's results (the dashboard polls every 3 s)."""
CHECK_NICE = 10
"""The priority of the process that checks files through a model: below the engine and the
server, yet not 19. At 19 it got about 1.5% of a core beside two busy processes (a training
job, an evaluation), and its start alone (importing torch and transformers) took minutes."""
MAX_WAITING_VALIDATIONS = 16
"""Model-based file checks (GET /v1/files/{id}/validation?model=) waiting for the one running;
more are refused with 429 `server_overloaded`."""


# ----------------------------------------------------------------------------- the service


class ModelPublisher:
    """Loads succeeded jobs' adapters (and their last checkpoints) into the inference engine."""

    def __init__(self, store: JobStore, engine: Any | None, log: Callable[[str], None]):
        self.store, self.engine, self.log = store, engine, log
        self.published: set[str] = set()
        self.fetch_failed: set[str] = set()
        self.lock = threading.Lock()

    def publish(self, name: str, path: Path) -> None:
        if self.engine is None:
            return
        with self.lock:
            if name in self.published or not Path(path).is_dir():
                return
            try:
                self.engine.add_adapter(name, path)
                self.published.add(name)
                self.log(f"model {name} is served")
            except Exception as exc:  # a bad adapter must not stop the others
                self.published.add(name)
                self.log(f"could not load {name} from {path}: {exc}")

    def unpublish(self, name: str) -> None:
        """Stop serving a model published for a job that then did not succeed."""
        if self.engine is None:
            return
        with self.lock:
            if name not in self.published:
                return
            self.published.discard(name)
            try:
                self.engine.remove_adapter(name)
                self.log(f"model {name} is no longer served: its job did not succeed")
            except Exception as exc:
                self.log(f"could not remove {name}: {exc}")

    def sync(self) -> None:
        for job in self.store.succeeded_jobs():
            self.publish_job(job)

    def publish_job(self, job: dict[str, Any]) -> None:
        """Serve a succeeded job's model and its last checkpoints (no-op once done)."""
        if self.engine is None or job["status"] != "succeeded":
            return
        lineage = job["lineage"] or {}
        if job["fine_tuned_model"] and lineage.get("adapter"):
            self.publish(job["fine_tuned_model"], self._local(job["fine_tuned_model"], lineage["adapter"]))
        ckpts, _ = self.store.list_checkpoints(job["id"], limit=PUBLISHED_CHECKPOINTS)
        for c in ckpts:
            self.publish(c["fine_tuned_model_checkpoint"], self._local(c["fine_tuned_model_checkpoint"], c["path"]))

    def _local(self, name: str, rel: str) -> Path:
        """The adapter's folder here, fetched from the shared storage when another machine's
        worker trained it (--storage); a failure is logged once, and tried again next sync."""
        if name in self.published:
            return self.store.storage_root / rel
        try:
            return self.store.local_dir(rel)
        except StorageError as exc:
            if name not in self.fetch_failed:
                self.fetch_failed.add(name)
                self.log(f"could not fetch {name}: {exc}")
            return self.store.storage_root / rel


def check_through_model(path: Path, model: str, against: Path | None) -> dict[str, Any]:
    """A file's validation report through `model`'s template, with the audit (run in the
    service's checking process)."""
    report = validate_data(path, model=model, validation=against).to_dict()
    if report["examples"]:
        problems, report["audit"] = audit_problems(path, against)
        report["warnings"] += problems
    return report


def _start_checker() -> None:
    """The checking process's start: its imports (this module's, and transformers, which loads
    the model's tokenizer; several CPU seconds) at the server's priority, then CHECK_NICE for
    the checks themselves."""
    import transformers  # noqa: F401

    os.nice(CHECK_NICE)


class JobsService:
    """The jobs API router plus, while the app runs, `workers` worker threads and the publisher."""

    def __init__(self, store: JobStore, workers: int = 1, worker_config: WorkerConfig = WorkerConfig(),
                 engine: Any | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 log: Callable[[str], None] | None = None, path_roots: Sequence[Path] | None = None,
                 allow_python_graders: bool = False):
        self.store = store
        self.allow_python_graders = allow_python_graders
        """Whether reinforcement jobs may use python graders (tunesmith serve --allow-python-graders)."""
        self.path_roots = tuple(path_roots) if path_roots is not None else (store.storage_root,)
        """Where a job's `model`, given as a folder, must resolve (Settings.path_roots)."""
        self.n_workers = workers
        self.worker_config = worker_config
        self.max_upload_bytes = max_upload_bytes
        self.log = log or (lambda msg: print(f"[jobs] {msg}", file=sys.stderr, flush=True))
        self.publisher = ModelPublisher(store, engine, self.log)
        # One model-based file check at a time: loading a model (for the speed estimate) is not
        # thread-safe in transformers, and each check uses every core anyway. Those waiting
        # their turn wait without a thread (each held one of the threads chats render in, and
        # a flood of them starved every chat, issue 19); more than 16 waiting are a 429.
        # The check runs in a process of its own at the lowest CPU priority: rendering and
        # tokenizing a 1 MB line takes 0.8 s of a core and holds the GIL up to 70 ms at a
        # time, which in this process slowed the engine's decode steps (docs/benchmarks.md).
        self._validation_lock = threading.Lock()
        self._checker: ProcessPoolExecutor | None = None
        self._validations = GraderSlots(1, MAX_WAITING_VALIDATIONS, what="model-based file checks")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sweeps: dict[str, tuple[float, dict[str, Any]]] = {}
        self._sweep_storage: Any = None
        self._sweep_limiter = anyio.CapacityLimiter(1)
        self.router = self._build_router()

    # -- lifecycle

    def start(self) -> None:
        self._stop.clear()
        self.publisher.sync()
        for i in range(self.n_workers):
            worker = Worker(self.store, self.worker_config, on_model_ready=self.publisher.publish,
                            on_model_gone=self.publisher.unpublish)
            t = threading.Thread(target=worker.run, args=(self._stop,), name=f"jobs-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._publish_loop, name="jobs-publisher", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.worker_config.stop_timeout_s + 5)
        self._threads.clear()
        with self._validation_lock:
            if self._checker is not None:
                self._checker.shutdown(cancel_futures=True)
                self._checker = None

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.worker_config.poll_interval_s):
            try:
                # Also on an API-only node: a job whose worker vanished does not stay "running".
                for job_id in self.store.requeue_lapsed(self.worker_config.lease_s):
                    self.log(f"{job_id}: its worker stopped heartbeating; queued again")
                self.publisher.sync()
            except Exception as exc:
                self.log(f"background sync failed: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    # -- routes

    def _build_router(self) -> APIRouter:
        router = APIRouter(lifespan=self.lifespan, tags=["fine-tuning"])
        router.add_api_route("/v1/files", self.create_file, methods=["POST"])
        router.add_api_route("/v1/files", self.list_files, methods=["GET"])
        router.add_api_route("/v1/files/{file_id}", self.retrieve_file, methods=["GET"])
        router.add_api_route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"])
        router.add_api_route("/v1/files/{file_id}/content", self.file_content, methods=["GET"])
        router.add_api_route("/v1/files/{file_id}/validation", self.file_validation, methods=["GET"])
        router.add_api_route("/v1/fine_tuning/jobs", self.create_job, methods=["POST"])
        router.add_api_route("/v1/fine_tuning/jobs", self.list_jobs, methods=["GET"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}", self.retrieve_job, methods=["GET"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}/pause", self.pause_job, methods=["POST"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}/resume", self.resume_job, methods=["POST"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}/events", self.list_events, methods=["GET"])
        router.add_api_route("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.list_checkpoints, methods=["GET"])
        router.add_api_route("/v1/sweeps/{name}", self.retrieve_sweep, methods=["GET"])
        return router

    # -- files

    async def create_file(self, request: Request) -> dict[str, Any]:
        """Upload a JSONL file (multipart: file, purpose=fine-tune); checked, stored under a new id."""
        from starlette.concurrency import run_in_threadpool

        files_dir = self.store.storage_root / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        fields, upload = await receive_upload(request, files_dir, self.max_upload_bytes)
        try:
            if not upload:
                raise APIError(400, "the upload has no 'file' part", code="invalid_request", param="file")
            purpose = fields.get("purpose", "")
            if purpose != "fine-tune":
                raise APIError(400, f"purpose '{purpose}' is not supported; tunesmith stores files with "
                                    "purpose=fine-tune", code="invalid_request", param="purpose")

            # The minimum example count is checked per job: a validation file may be small.
            check = await run_in_threadpool(check_file, upload["path"], None, 1)
            file_id = new_id("file")
            rel = Path("files") / f"{file_id}.jsonl"
            os.replace(upload["path"], self.store.storage_root / rel)
            try:  # before the row: a worker that sees the file's id can fetch it (--storage)
                await run_in_threadpool(self.store.publish_file, rel)
            except StorageError as exc:
                (self.store.storage_root / rel).unlink(missing_ok=True)
                self.log(f"upload {file_id}: {exc}")
                raise APIError(503, "the file could not be written to the shared storage the workers read "
                                    "(--storage); see the server log, and upload it again", code="storage_unavailable",
                               param="file") from None
            details = None if check.ok else check.summary("the file")
            row = self.store.add_file({
                "id": file_id, "created_at": int(time.time()), "bytes": upload["bytes"],
                "filename": upload["filename"], "purpose": purpose, "status": "processed",
                "status_details": details, "sha256": upload["sha256"].hexdigest(), "path": str(rel),
                "validation": check.to_dict(),
            })
        finally:
            if upload.get("path"):
                upload["path"].unlink(missing_ok=True)
        return file_object(row)

    def list_files(self, purpose: str | None = None, limit: int = 100, after: str | None = None,
                   order: str = "desc") -> dict[str, Any]:
        rows, more = self.store.list_files(purpose, after, _limit(limit, 10_000), _order(order))
        return page([file_object(r) for r in rows], more)

    def _file(self, file_id: str) -> dict[str, Any]:
        row = self.store.get_file(file_id)
        if row is None:
            raise APIError(404, f"no file with id '{file_id}'", code="not_found", param="file_id")
        return row

    def retrieve_file(self, file_id: str) -> dict[str, Any]:
        return file_object(self._file(file_id))

    def file_content(self, file_id: str) -> FileResponse:
        row = self._file(file_id)
        return FileResponse(self.store.local_file(row), media_type="application/octet-stream")

    async def file_validation(self, file_id: str, model: str | None = None,
                              validation_file: str | None = None) -> dict[str, Any]:
        """The validator's report on an uploaded file (a tunesmith extension of the files API).

        Without `model`: what the upload check found (examples, line-numbered errors and
        warnings). With `model`: `tunesmith validate`'s full report through that model's chat
        template, with token stats and a measured time estimate; `validation_file` adds the
        overlap check against that uploaded file.
        """
        row = self._file(file_id)
        if model is None:
            if validation_file is not None:
                raise APIError(400, "validation_file is compared through a model's template; give 'model' too",
                               code="invalid_request", param="validation_file")
            stored = row["validation"] or {"examples": 0, "errors": [], "warnings": []}
            return _validation_object(file_id, None, {**stored, "ok": not stored["errors"], "format": None,
                                                      "stats": None, "estimate": None})
        from starlette.concurrency import run_in_threadpool

        base = self._base_model(model)
        against = None
        if validation_file is not None:
            against = await run_in_threadpool(self.store.local_file, self._file(validation_file))
        path = await run_in_threadpool(self.store.local_file, row)
        report = await self._validations.run(self._validate_with_model, path, base, against)
        return _validation_object(file_id, model, report)

    def _base_model(self, model: str) -> str:
        """The base model a job on `model` trains (a fine-tuned model's base), checked to exist;
        a folder only under the server's allowed roots (one answer for missing or not allowed)."""
        if model not in REGISTRY and not model.startswith("ft:"):
            if not looks_like_path(model):  # never looked up relative to the server's directory
                raise APIError(400, f"model '{model}' is neither a registry name ({', '.join(sorted(REGISTRY))}), a "
                                    "fine-tuned model (ft:...) nor a folder path (with a '/')",
                               code="model_not_found", param="model")
            model = str(confined_path(model, self.path_roots, "model", "model"))
        try:
            base, _ = self.store.base_and_adapter(model)
            resolve_model(base, home=self.store.storage_root)
        except TunesmithError as exc:
            raise APIError(400, str(exc), code="model_not_found", param="model")
        return base

    def _validate_with_model(self, path: Path, model: str, against: Path | None) -> dict[str, Any]:
        with self._validation_lock:
            if self._checker is None:  # started at the first check, kept for the next ones
                self._checker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_checker)
            try:
                return self._checker.submit(check_through_model, path, model, against).result()
            except BrokenProcessPool:  # the checking process died (e.g. killed for memory)
                self._checker = None
                raise APIError(503, "the process checking files stopped unexpectedly; retry the request",
                               code="server_error", retry_after_s=5)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self._file(file_id)
        user = self.store.file_in_use(file_id)
        if user:
            raise APIError(409, f"file '{file_id}' is used by unfinished job {user}; cancel the job first",
                           code="file_in_use", param="file_id")
        row = self.store.delete_file(file_id)
        if row:
            (self.store.storage_root / row["path"]).unlink(missing_ok=True)
            try:
                self.store.unpublish_file(row["path"])
            except StorageError as exc:  # the row is gone: the copy left there is never read
                self.log(f"delete {file_id}: {exc}")
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs

    def create_job(self, body: JobCreate, request: Request) -> dict[str, Any]:
        """Create a fine-tuning job; a worker validates its files, then trains it."""
        method = _method(body, self.allow_python_graders)
        if method["type"] == "reinforcement":  # judges (score_model, label_model) ask this server
            method["reinforcement"]["judge_base_url"] = own_endpoint(request).base_url
        integrations = _integrations(body, self.path_roots)
        self._base_model(body.model)  # a base model, or an earlier job's fine-tuned model to continue
        job_id = new_id("ftjob")
        name = ft_model_name(body.model, body.suffix, job_id)
        if not ADAPTER_NAME.match(name):  # refused now, not once trained, when it could not be served
            raise APIError(400, f"the fine-tuned model would be named '{name}', which cannot be served: a name takes "
                                "letters, digits, '_', '-', '.' and ':' (at most 128); rename the model's folder or "
                                "shorten the suffix", param="model", code="invalid_model_name")
        for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if file_id is None:
                continue
            row = self.store.get_file(file_id)
            if row is None:
                raise APIError(400, f"{param} '{file_id}' names no uploaded file; upload it with "
                                    "POST /v1/files (purpose=fine-tune) first", code="invalid_file", param=param)
            if row["purpose"] != "fine-tune":
                raise APIError(400, f"{param} '{file_id}' has purpose {row['purpose']}, not fine-tune",
                               code="invalid_file", param=param)
        row = self.store.create_job({
            "id": job_id, "model": body.model, "training_file": body.training_file,
            "validation_file": body.validation_file, "method": method, "suffix": body.suffix,
            "seed": body.seed if body.seed is not None else random.randint(0, 2**31 - 1),
            "metadata": body.metadata, "integrations": integrations,
        }, first_event=f"Created fine-tuning job: {job_id}")
        return job_object(row)

    def list_jobs(self, request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        meta = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
        rows, more = self.store.list_jobs(after, _limit(limit, 100), meta or None)
        return page([job_object(r) for r in rows], more)

    def _job(self, job_id: str) -> dict[str, Any]:
        row = self.store.get_job(job_id)
        if row is None:
            raise APIError(404, f"no fine-tuning job with id '{job_id}'", code="not_found", param="fine_tuning_job_id")
        return row

    def retrieve_job(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        # A job another machine's worker finished: load its model before the client, who now
        # sees "succeeded", asks for it (the background sync would take up to a poll interval).
        self.publisher.publish_job(job)
        return job_object(job)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel in any unfinished state; a running trainer stops within seconds, checkpoint kept."""
        self._job(job_id)
        job, changed = self.store.transition(job_id, ACTIVE, "cancelled", "Job cancelled",
                                             finished_at=int(time.time()), estimated_finish=None)
        if not changed and job["status"] != "cancelled":
            raise APIError(400, f"job {job_id} already {job['status']}; only unfinished jobs can be cancelled",
                           code="invalid_state")
        return job_object(self._job(job_id))

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """Pause a queued or running job; its trainer checkpoints and stops, resume continues it."""
        self._job(job_id)
        job, changed = self.store.transition(job_id, ("queued", "running"), "paused", "Job paused",
                                             estimated_finish=None)
        if not changed and job["status"] != "paused":
            raise APIError(400, f"job {job_id} is {job['status']}; only queued or running jobs can be paused",
                           code="invalid_state")
        return job_object(self._job(job_id))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        """Queue a paused job again; the next free worker continues it from its last checkpoint.
        A job its worker still holds (resumed before the worker saw the pause) goes back to
        running under that worker, instead of being queued for a second run of it."""
        held = self._job(job_id)["worker_id"] is not None
        job, changed = self.store.transition(job_id, ("paused",), "running" if held else "queued", "Job resumed")
        if not changed:
            raise APIError(400, f"job {job_id} is {job['status']}; only paused jobs can be resumed",
                           code="invalid_state")
        return job_object(self._job(job_id))

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        self._job(job_id)
        rows, more = self.store.list_events(job_id, after, _limit(limit, 1000))
        return page([event_object(r) for r in rows], more)

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> dict[str, Any]:
        self._job(job_id)
        rows, more = self.store.list_checkpoints(job_id, after, _limit(limit, 1000))
        return page([checkpoint_object(r) for r in rows], more)


    async def retrieve_sweep(self, name: str) -> dict[str, Any]:
        """tunesmith's own: a `tunesmith sweep`'s trials, curves, best trial and importances,
        read from its optuna study in this server's database. The dashboard polls it, so one
        result per sweep is reused for SWEEP_CACHE_S (the importances fit a forest). Reads run
        one at a time in a thread of their own: a flood of them waits on the event loop, never
        in the thread pool every other jobs route needs."""
        import importlib.util
        import re

        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise APIError(404, "no sweep by that name: a sweep's name is 1-64 letters, digits, '_', '.' or '-'",
                           code="not_found", param="name")
        if importlib.util.find_spec("optuna") is None:
            raise APIError(501, "this server cannot read sweeps: optuna is not installed (pip install "
                                "'tunesmith[sweep]')", code="not_supported", param="name")
        results = await anyio.to_thread.run_sync(self._sweep_results, name, limiter=self._sweep_limiter)
        if results is None:
            raise APIError(404, f"no sweep named '{name}' in this server's database", code="not_found", param="name")
        return {"object": "sweep", **results}

    def _sweep_results(self, name: str) -> dict[str, Any] | None:
        """The cached results of a sweep (misses are not cached: they cost one query and would
        push out the real sweeps)."""
        now = time.monotonic()
        hit = self._sweeps.get(name)
        if hit is not None and now - hit[0] <= SWEEP_CACHE_S:
            return hit[1]
        if self._sweep_storage is None:
            self._sweep_storage = open_sweep_storage(self.store)
        results = load_sweep_results(self.store, name, self._sweep_storage)
        if results is not None:
            if name not in self._sweeps and len(self._sweeps) >= 64:
                self._sweeps.pop(min(self._sweeps, key=lambda k: self._sweeps[k][0]))
            self._sweeps[name] = (now, results)
        return results


def _validation_object(file_id: str, model: str | None, report: dict[str, Any]) -> dict[str, Any]:
    return {"object": "file.validation", "file_id": file_id, "model": model, "ok": report["ok"],
            "format": report["format"], "examples": report["examples"], "errors": report["errors"],
            "warnings": report["warnings"], "stats": report["stats"], "estimate": report["estimate"],
            "audit": report.get("audit")}


def _limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise APIError(400, f"limit must be between 1 and {most}, got {limit}", code="invalid_request", param="limit")
    return limit


def _order(order: str) -> str:
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be asc or desc, got '{order}'", param="order")
    return order


def _integrations(body: JobCreate, roots: Sequence[Path]) -> list[dict[str, Any]] | None:
    """The job's trackers as given (OpenAI's shape), checked: each type once, its settings under
    the key of its type, one project for all, its library installed on this server, and an
    MLflow store on this server's disk only in a folder clients may name (`roots`)."""
    if not body.integrations:
        return None
    seen, projects = [], {}
    for i, entry in enumerate(body.integrations):
        param = f"integrations[{i}]"
        if entry.type in seen:
            raise APIError(400, f"{param}: a second '{entry.type}' integration; give each type once", param=param)
        seen.append(entry.type)
        others = [k for k in ("wandb", "mlflow", "tensorboard", "trackio") if k != entry.type and getattr(entry, k)]
        if others:
            raise APIError(400, f"{param}: type '{entry.type}' with settings under '{others[0]}'; put them under "
                                f"'{entry.type}'", param=f"{param}.{others[0]}")
        settings = getattr(entry, entry.type)
        if settings is None and entry.type != "tensorboard":
            raise APIError(400, f"{param}: type '{entry.type}' needs its settings under '{entry.type}', e.g. "
                                f'{{"type": "{entry.type}", "{entry.type}": {{"project": "my-project"}}}}',
                           param=f"{param}.{entry.type}")
        if getattr(settings, "project", None):
            projects[entry.type] = settings.project
        uri = getattr(settings, "tracking_uri", None)
        if uri and not uri.startswith(("http://", "https://", "databricks")):  # a local store: its folder
            local = uri.split(":///", 1)[1] if ":///" in uri else uri.removeprefix("file:")
            confined_path(str(Path(local).parent), roots, f"{param}.mlflow.tracking_uri", "folder for the MLflow store")
    if len(set(projects.values())) > 1:
        named = ", ".join(f"{k}: {v}" for k, v in projects.items())
        raise APIError(400, f"the integrations name different projects ({named}); a job reports to one project "
                            "name in every tracker", param="integrations")
    missing = missing_trackers(seen)
    if missing:
        raise APIError(400, "this server cannot report to every integration asked for: " + "; ".join(missing)
                       + " (on the server)", code="integration_not_installed", param="integrations")
    return [{"type": e.type, e.type: getattr(e, e.type).model_dump() if getattr(e, e.type) else {}}
            for e in body.integrations]


def _method(body: JobCreate, allow_python_graders: bool = False) -> dict[str, Any]:
    """The job's method with every hyperparameter present ("auto" until the worker resolves it)."""
    kind = body.method.type if body.method is not None else "supervised"
    for other in ("supervised", "dpo", "reinforcement"):
        if other != kind and body.method is not None and getattr(body.method, other) is not None:
            raise APIError(400, f"method.{other} was given with method.type '{kind}'; put the hyperparameters under "
                                f"method.{kind}", param=f"method.{other}")
    if kind == "reinforcement":
        if body.hyperparameters is not None:
            raise APIError(400, "a reinforcement job takes its hyperparameters in method.reinforcement.hyperparameters, "
                                "not at the top level", param="hyperparameters")
        if body.method.reinforcement is None:
            raise APIError(400, "a reinforcement job needs method.reinforcement.grader: the grader that scores each "
                                "sampled answer", param="method.reinforcement.grader")
        param = "method.reinforcement.grader"
        try:
            grader = parse_grader(body.method.reinforcement.grader, param)
            refuse_python(grader, allow_python_graders, param)  # before parsing any source
            validate_grader(grader, param)
        except GraderError as exc:
            raise APIError(400, str(exc), code="invalid_grader", param=exc.param) from None
        return {"type": "reinforcement", "reinforcement": {
            "grader": grader.model_dump(exclude_none=True),
            "hyperparameters": body.method.reinforcement.hyperparameters.model_dump()}}
    if kind == "dpo":
        if body.hyperparameters is not None:
            raise APIError(400, "a dpo job takes its hyperparameters in method.dpo.hyperparameters, not at the top "
                                "level", param="hyperparameters")
        hp = body.method.dpo.hyperparameters if body.method.dpo is not None else DpoHyperparameters()
        return {"type": "dpo", "dpo": {"hyperparameters": hp.model_dump(exclude_none=True)}}
    hp = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        if hp is not None:
            raise APIError(400, "give hyperparameters either at the top level or in method.supervised, not both",
                           param="hyperparameters")
        hp = body.method.supervised.hyperparameters
    hp = hp or Hyperparameters()
    return {"type": "supervised", "supervised": {"hyperparameters": hp.model_dump(exclude_none=True)}}


def create_jobs_app(service: JobsService, api_key: str | None = None) -> FastAPI:
    """An app with only the jobs API (an API-only node, or when no inference engine is wanted),
    behind `api_key` when one is given, with the same error answers as the full server."""
    app = FastAPI(title="tunesmith jobs")
    app.state.api_key = api_key
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # uploads have their own, --max-upload-mb
    app.add_middleware(KeyGate, api_key=api_key)
    app.include_router(service.router, dependencies=[Depends(require_api_key)])
    return app


def build_jobs_service(db: str | None, workers: int, engine: Any | None, max_upload_mb: float,
                       settings: Any = None, log: Callable[[str], None] | None = None,
                       leakage_error: bool = False, executor: Executor = Executor()) -> JobsService:
    """What `tunesmith serve --db --workers --max-upload-mb --leakage-error` mounts: checks the options, opens the store.

    The routes are meant to sit behind the server's own API key dependency, so the
    service checks none itself.
    """

    if workers < 0:
        raise UsageError(f"--workers must be 0 (API only) or more, got {workers}")
    if max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    executor.check()
    store = open_store(db, settings)
    roots = settings.path_roots() if settings is not None else None
    return JobsService(store, workers=workers, engine=engine, max_upload_bytes=int(max_upload_mb * 1e6), log=log,
                       path_roots=roots, worker_config=WorkerConfig(leakage_error=leakage_error, executor=executor,
                                                                    judge_api_key=getattr(settings, "api_key", None)),
                       allow_python_graders=bool(getattr(settings, "python_graders", False)))
