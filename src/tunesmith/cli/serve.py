"""`tunesmith serve`, `chat` and `worker`: a model and its adapters behind the
OpenAI-compatible API (with the fine-tuning jobs API), in the terminal, or a jobs worker alone.

    tunesmith serve --adapter support=runs/first
    echo 'Where is my card?' | tunesmith chat --adapter runs/first
    tunesmith worker --db postgresql://tunesmith@db/tunesmith
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from tunesmith.cli.common import WEIGHTS_HELP
from tunesmith.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from tunesmith.settings import Settings

MODEL_HELP = "Base model: registry name or path."
LEAKAGE_HELP = ("Fail a job whose training file repeats validation rows (exact or near duplicates) instead of "
                "warning (needs the audit extra for near duplicates).")
EXECUTOR_HELP = ("Where jobs train: local (a child process here; a job's n_workers > 1 runs --nproc) or ray "
                 "(a Ray Train job on --ray-address with the job's n_workers and gpus_per_worker; pip install "
                 "'tunesmith\\[ray]').")
RAY_ADDRESS_HELP = "With --executor ray: the cluster (HOST:6379, ray://HOST:10001; default auto, the local `ray start`)."
RAY_STORAGE_HELP = ("With --executor ray: where Ray keeps the jobs' checkpoints, a folder every node shares or an "
                    "object store URI (default: STORAGE/ray with --storage, else each job's folder under "
                    "$TUNESMITH_HOME/jobs).")
STORAGE_HELP = ("A URI the API node and every worker read (s3://bucket/prefix, gs://..., file:///shared/folder; "
                "default: $TUNESMITH_STORAGE): uploads and finished adapters go there too, so workers need not "
                "share $TUNESMITH_HOME, only --db (docs/scale-out.md; pip install 'tunesmith\\[storage]').")
DB_HELP = "Jobs database: sqlite:///PATH or postgresql://USER@HOST/DB (default: $TUNESMITH_HOME/tunesmith.db)."


def serve_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", help="NAME=PATH of a run or adapter directory to serve as model NAME (repeatable)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $TUNESMITH_API_KEY, else none)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU threads for generation (default: torch's, one per core); "
        "1 is often faster on a CPU shared with other work."
    ),
    weights: str = typer.Option("fp32", "--weights", help=WEIGHTS_HELP),
    engine_process: bool = typer.Option(
        True, "--engine-process/--engine-in-process", help="Run the model in its own process (default), so a "
        "flood of requests cannot starve generation of CPU; in-process saves its start (a few seconds) and "
        "the tokenizer's second copy."
    ),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    workers: int = typer.Option(1, "--workers", help="Fine-tuning job workers in this process (0: API only)."),
    max_upload_mb: float = typer.Option(512.0, "--max-upload-mb", help="Largest file /v1/files accepts, in MB."),
    max_adapters: int = typer.Option(
        64, "--max-adapters", min=0, help="Adapters served under chosen names (--adapter and POST /v1/adapters; "
        "the ft: models jobs publish aside); more are refused until one is deleted."
    ),
    allow_path: Optional[list[Path]] = typer.Option(
        None, "--allow-path", help="A folder besides $TUNESMITH_HOME whose models and adapters clients may name "
        "over HTTP (repeatable)."
    ),
    insecure_no_key: bool = typer.Option(
        False, "--insecure-no-key", help="Serve a non-loopback --host without an API key (anyone who reaches it "
        "can use it)."
    ),
    allow_python_graders: bool = typer.Option(
        False, "--allow-python-graders", help="Let API clients run python graders: no network, CPU and memory "
        "limited, but their code can read the files this server's user can (docs/rft.md)."
    ),
    leakage_error: bool = typer.Option(False, "--leakage-error", help=LEAKAGE_HELP),
    executor: str = typer.Option("local", "--executor", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_storage: Optional[str] = typer.Option(None, "--ray-storage", help=RAY_STORAGE_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
) -> None:
    """OpenAI-compatible server for a base model and many adapters, with the fine-tuning jobs API."""
    import dataclasses
    import os

    from tunesmith.errors import UsageError

    pairs = _adapter_pairs(adapter or [])  # before the heavy imports: a typo fails at once
    key = api_key or os.environ.get("TUNESMITH_API_KEY") or None
    if not key and not insecure_no_key and not _is_loopback(host):
        raise UsageError(f"--host {host} reaches beyond this machine, and no API key is set: set $TUNESMITH_API_KEY "
                         "(kept out of `ps`, unlike --api-key), or pass --insecure-no-key to serve it open")
    _check_weights(weights)
    from tunesmith.jobs.worker import Executor
    from tunesmith.settings import Settings

    settings = _with_storage(Settings.from_env(), storage)
    placement = Executor(executor, ray_address, _ray_storage(ray_storage, settings.storage, executor))
    placement.check()

    import torch
    import uvicorn

    from tunesmith.generate.engine import LocalEngine
    from tunesmith.serve.app import create_app

    if threads:
        torch.set_num_threads(threads)
    if api_key:
        settings = dataclasses.replace(settings, api_key=api_key)
    if allow_path:
        settings = dataclasses.replace(settings, allowed_paths=tuple(p.expanduser().resolve() for p in allow_path))
    if allow_python_graders:
        settings = dataclasses.replace(settings, python_graders=True)
    typer.echo(f"loading {model} ({weights} weights) and {len(pairs)} adapter(s) ...", err=True)
    if engine_process:
        from tunesmith.generate.process import ProcessEngine

        engine: Any = ProcessEngine(model, pairs, weights=weights, threads=threads)
    else:
        engine = LocalEngine.load(model, pairs, weights=weights)
    from tunesmith.serve.jobs_api import build_jobs_service

    jobs = build_jobs_service(db, workers, engine, max_upload_mb, settings, leakage_error=leakage_error,
                              executor=placement)
    try:
        url = f"http://{host}:{port}/v1"
        typer.echo(f"serving at {url} (OpenAI-compatible; key {'required' if settings.api_key else 'not required'})",
                   err=True)
        for card in engine.models():
            kind = f"adapter on {card.parent}, from {card.path}" if card.parent else "base model"
            typer.echo(f"  model {card.id!r}: {kind}", err=True)
        typer.echo(f"  fine-tuning jobs: {url}/fine_tuning/jobs ({workers} worker(s) in this process)", err=True)
        typer.echo(f"  dashboard: http://{host}:{port}/", err=True)
        from tunesmith.serve.dashboard import mount_dashboard

        from tunesmith.serve.limits import Limits

        server_app = create_app(engine, settings, routers=[jobs.router], limits=Limits(max_adapters=max_adapters))
        mount_dashboard(server_app)
        uvicorn.run(server_app, host=host, port=port, log_level="info")
    finally:
        engine.close()


def _with_storage(settings: Settings, storage: Optional[str]) -> Settings:
    """Settings with --storage, when given, in place of $TUNESMITH_STORAGE; a URI pyarrow cannot
    open fails here, before a model loads."""
    import dataclasses

    from tunesmith.jobs.shared_storage import SharedStorage

    settings = dataclasses.replace(settings, storage=storage) if storage else settings
    if settings.storage:
        SharedStorage(settings.storage, settings.home)
    return settings


def _ray_storage(ray_storage: Optional[str], storage: Optional[str], executor: str) -> Optional[str]:
    """--ray-storage, else STORAGE/ray for the Ray executor: checkpoints go where every node reads."""
    if ray_storage or not storage or executor != "ray":
        return ray_storage
    return storage.rstrip("/") + "/ray"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _adapter_pairs(specs: list[str]) -> list[tuple[str, str]]:
    from tunesmith.errors import UsageError

    pairs, bad = [], []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            bad.append(spec)
        else:
            pairs.append((name, path))
    if bad:
        raise UsageError(f"--adapter expects NAME=PATH (e.g. support=runs/support); got: {', '.join(bad)}")
    return pairs


def _check_weights(weights: str) -> None:
    from tunesmith.models.inference import check_weights

    check_weights(weights)


def chat_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Run or adapter directory to chat with."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Most tokens per answer (default: up to the context length)."
    ),
    weights: str = typer.Option("fp32", "--weights", help=WEIGHTS_HELP),
) -> None:
    """Chat with a model or adapter in the terminal (or answer one piped question)."""
    import io

    from tunesmith.errors import UsageError
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.serve.chat import run_chat

    _check_weights(weights)
    interactive = sys.stdin.isatty()
    stdin = sys.stdin
    if interactive:
        typer.echo(f"loading {model} ...", err=True)
    else:  # read the piped question before the model loads, so an empty pipe fails at once
        stdin = io.StringIO(sys.stdin.read())
        if not stdin.getvalue().strip():
            raise UsageError("no question on standard input; pipe one in (echo 'question' | tunesmith chat)")
    adapters = [("adapter", str(adapter))] if adapter else []
    engine = LocalEngine.load(model, adapters, weights=weights)
    try:
        run_chat(engine, "adapter" if adapter else engine.base_id, stdin, sys.stdout, interactive, temperature,
                 max_tokens)
    finally:
        engine.close()


def worker_cmd(
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    poll_interval_s: float = typer.Option(1.0, "--poll-interval-s", help="Seconds between looks for work and heartbeats."),
    lease_s: float = typer.Option(30.0, "--lease-s", help="A job whose worker sent no heartbeat for this long is taken over."),
    leakage_error: bool = typer.Option(False, "--leakage-error", help=LEAKAGE_HELP),
    executor: str = typer.Option("local", "--executor", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_storage: Optional[str] = typer.Option(None, "--ray-storage", help=RAY_STORAGE_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
) -> None:
    """Run one fine-tuning jobs worker (no API) against a shared jobs database."""
    import signal
    import threading

    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import Executor, Worker, WorkerConfig
    from tunesmith.settings import Settings

    settings = _with_storage(Settings.from_env(), storage)
    placement = Executor(executor, ray_address, _ray_storage(ray_storage, settings.storage, executor))
    placement.check()
    store = open_store(db, settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stop cleanly: the running trainer checkpoints and the job is queued again.
        signal.signal(sig, lambda *_: stop.set())
    Worker(store, WorkerConfig(poll_interval_s=poll_interval_s, lease_s=lease_s, leakage_error=leakage_error,
                               executor=placement)).run(stop)
