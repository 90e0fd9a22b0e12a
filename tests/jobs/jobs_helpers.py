"""Shared by the jobs tests (imported by name, like tests/evaluate's helpers, so that no second
conftest.py shadows the root one): a live jobs server on loopback (uvicorn in a thread) with
the official openai client, a throwaway PostgreSQL, data files."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest


@dataclass
class Live:
    url: str
    client: Any
    """openai.OpenAI pointed at the server."""
    store: Any
    service: Any
    home: Path


def write_chat_jsonl(path: Path, n: int = 12, bad_lines: dict[int, str] | None = None) -> Path:
    """n tiny chat examples (words the tiny tokenizer knows); bad_lines replaces 1-based lines."""
    pairs = [("What is the capital of France?", "Paris"), ("How do I reset my password?", "forgot password"),
             ("I am still waiting on my card?", "card_arrival")]
    lines = []
    for i in range(n):
        q, a = pairs[i % len(pairs)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    for line_no, text in (bad_lines or {}).items():
        lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def upload(live: Live, path: Path) -> Any:
    """Upload a training or validation file with the official client."""
    with open(path, "rb") as fh:
        return live.client.files.create(file=fh, purpose="fine-tune")


def finished(live: Live, job_id: str) -> Any:
    """The job once it has ended (succeeded, failed or cancelled), else None (for wait_for)."""
    job = live.client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def wait_for(predicate: Callable[[], Any], timeout_s: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def start_uvicorn(app: Any) -> tuple[str, Callable[[], None]]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the server to start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def jobs_server(_isolated_home, tmp_path_factory):
    """Factory: start a jobs server (API + `workers` worker threads) on loopback."""
    import openai

    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import WorkerConfig
    from tunesmith.serve.jobs_api import JobsService, create_jobs_app

    stops: list[Callable[[], None]] = []

    def make(workers: int = 1, max_upload_bytes: int = 10_000_000, lease_s: float = 5.0,
             db: str | None = None, engine: Any = None, app_factory: Callable[[Any], Any] | None = None,
             leakage_error: bool = False, executor: Any = None, allow_python_graders: bool = False) -> Live:
        store = open_store(db)
        # Jobs name the tiny model by its folder among pytest's temporary ones: allowed.
        service = JobsService(store, workers=workers, engine=engine, max_upload_bytes=max_upload_bytes,
                              path_roots=(store.storage_root, tmp_path_factory.getbasetemp()),
                              allow_python_graders=allow_python_graders,
                              worker_config=WorkerConfig(poll_interval_s=0.3, lease_s=lease_s, stop_timeout_s=20,
                                                         leakage_error=leakage_error,
                                                         **({"executor": executor} if executor else {})))
        app = (app_factory or create_jobs_app)(service)
        url, stop = start_uvicorn(app)
        stops.append(stop)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        return Live(url=url, client=client, store=store, service=service, home=_isolated_home)

    yield make
    for stop in reversed(stops):
        stop()


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql package), or a skip."""
    import os
    import pwd
    import shutil
    import subprocess

    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install -y postgresql); the PostgreSQL path is untested")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    import tempfile

    # Not under pytest's tmp dir: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    data = root / "data"
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                    "--no-sync"], capture_output=True, text=True)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed, so PostgreSQL tests cannot run: {init.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                     "-w", "-t", "60", "start"], capture_output=True, text=True)
    if start.returncode != 0:
        pytest.skip(f"the PostgreSQL server did not start: {start.stderr.strip()[-300:]}")
    yield f"postgresql://postgres@127.0.0.1:{port}"
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the test PostgreSQL server for one test."""
    import secrets

    import sqlalchemy as sa

    name = f"t_{secrets.token_hex(6)}"
    engine = sa.create_engine(f"{postgres_server.replace('postgresql://', 'postgresql+psycopg://')}/postgres",
                              isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return f"{postgres_server}/{name}"
