"""Durable state of the jobs service: files, jobs, events and checkpoints in one database.

SQLite (WAL) under `$TUNESMITH_HOME/tunesmith.db` by default; PostgreSQL when given a
`postgresql://` URL, so workers on several machines share one queue. The schema is
versioned: `schema_version` holds the last applied step of `MIGRATIONS`, and opening a
store applies the missing steps in order, in one transaction each.

Claiming is atomic: on PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED`, on SQLite every
transaction starts with `BEGIN IMMEDIATE` (the write lock is taken before the read), so
two workers can never take the same job. A claimed job carries its worker's id and a
heartbeat; once the heartbeat is older than the lease, any worker may claim it again.

    python -c "from tunesmith.jobs.store import open_store; print(open_store().url)"
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tunesmith.errors import ModelNotFoundError, UsageError
from tunesmith.jobs.shared_storage import SharedStorage, StorageError
from tunesmith.runs import ADAPTER_CONFIG_FILE
from tunesmith.settings import Settings

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Float, nullable=False),
)

files = sa.Table(
    "files",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_details", sa.Text),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("validation", sa.JSON),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("method", sa.JSON, nullable=False),
    sa.Column("suffix", sa.Text),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("metadata", sa.JSON),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("error", sa.JSON),
    sa.Column("fine_tuned_model", sa.Text),
    sa.Column("started_at", sa.Integer),
    sa.Column("finished_at", sa.Integer),
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("estimated_finish", sa.Integer),
    sa.Column("result_files", sa.JSON, nullable=False),
    sa.Column("lineage", sa.JSON),
    sa.Column("worker_id", sa.String(128)),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("integrations", sa.JSON),
    sa.Column("overrides", sa.JSON),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("fine_tuned_model_checkpoint", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.UniqueConstraint("job_id", "step", name="uq_checkpoint_job_step"),
)


def _migration_1(conn: Connection) -> None:
    """The first schema: files, jobs, events, checkpoints."""
    for table in (files, jobs, events, checkpoints):
        table.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    """Trackers and tunesmith's own training settings per job: `integrations` (OpenAI's shape,
    as the job was created) and `overrides` (TrainConfig keys a sweep trial sets, such as
    lora_rank). A fresh database already has them from _migration_1's create."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    for name in ("integrations", "overrides"):
        if name not in have:
            conn.exec_driver_sql(f"ALTER TABLE jobs ADD COLUMN {name} JSON")


# Ordered; never edit an applied step, append a new one.
MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def default_db_url(settings: Settings | None = None) -> str:
    settings = settings or Settings.from_env()
    return f"sqlite:///{settings.home / 'tunesmith.db'}"


def build_engine(url: str) -> Engine:
    """An engine for a sqlite:// or postgresql:// URL, set up for safe concurrent claims."""
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; tunesmith ships psycopg 3.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("postgresql+psycopg://"):
        return sa.create_engine(url, pool_pre_ping=True)
    if not url.startswith("sqlite:///"):
        raise UsageError(
            f"--db '{url}' is not supported; give sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    path = url[len("sqlite:///"):]
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # Let SQLAlchemy's "begin" hook issue BEGIN itself (pysqlite would defer it).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # Take the write lock up front: read-then-update (claims, transitions) is atomic.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> int:
    """Apply the missing migrations in order; return the schema version."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
    for version, step in enumerate(MIGRATIONS, start=1):
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Serialise concurrent first starts of several workers on one database.
                conn.exec_driver_sql("LOCK TABLE schema_version IN EXCLUSIVE MODE")
            done = conn.execute(
                sa.select(schema_version.c.version).where(schema_version.c.version == version)
            ).first()
            if done:
                continue
            step(conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=time.time()))
    return len(MIGRATIONS)


def _row(r: Any) -> dict[str, Any] | None:
    return dict(r._mapping) if r is not None else None


class JobStore:
    """Files, jobs, events and checkpoints; every method is one short transaction, except the
    `local_*` ones, which bring a file or an adapter from the shared storage when it is
    missing under `storage_root`, and `publish_*`, which put one there."""

    def __init__(self, engine: Engine, storage_root: Path, shared: SharedStorage | None = None):
        self.engine = engine
        self.storage_root = storage_root
        """Where uploaded files and job run directories live on this machine."""
        self.shared = shared
        """Storage every node reads (--storage): without it, every worker shares storage_root."""

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ this machine's copies

    def local_file(self, row: dict[str, Any]) -> Path:
        """A file row's path here, fetched from the shared storage (and checked against the
        row's size and sha256) when this machine does not have it."""
        if self.shared is None:
            return self.storage_root / row["path"]
        return self.shared.fetch_file(row["path"], size=row["bytes"], sha256=row["sha256"])

    def local_dir(self, rel: str | Path) -> Path:
        """An adapter folder's path here (`rel` under storage_root), fetched from the shared
        storage when missing; the path as it is when neither has it."""
        if self.shared is not None:
            self.shared.fetch_dir(rel)
        return self.storage_root / rel

    def publish_file(self, rel: str | Path) -> None:
        """Put storage_root/rel into the shared storage (no-op without one)."""
        if self.shared is not None:
            self.shared.put_file(rel)

    def publish_dir(self, rel: str | Path) -> None:
        if self.shared is not None:
            self.shared.put_dir(rel)

    def unpublish_file(self, rel: str | Path) -> None:
        if self.shared is not None:
            self.shared.delete_file(rel)

    # ------------------------------------------------------------------ files

    def add_file(self, row: dict[str, Any]) -> dict[str, Any]:
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(**row))
        return self.get_file(row["id"])  # type: ignore[return-value]

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self.engine.begin() as conn:
            return _row(conn.execute(sa.select(files).where(files.c.id == file_id)).first())

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 100,
                   order: str = "desc") -> tuple[list[dict[str, Any]], bool]:
        with self.engine.begin() as conn:
            q = sa.select(files)
            if purpose:
                q = q.where(files.c.purpose == purpose)
            return _page(conn, files, q, after, limit, order)

    def delete_file(self, file_id: str) -> dict[str, Any] | None:
        with self.engine.begin() as conn:
            row = _row(conn.execute(sa.select(files).where(files.c.id == file_id)).first())
            if row:
                conn.execute(files.delete().where(files.c.id == file_id))
            return row

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an unfinished job that reads this file, if any."""
        with self.engine.begin() as conn:
            r = conn.execute(
                sa.select(jobs.c.id).where(
                    sa.or_(jobs.c.training_file == file_id, jobs.c.validation_file == file_id),
                    jobs.c.status.in_(ACTIVE),
                )
            ).first()
            return r[0] if r else None

    # ------------------------------------------------------------------ jobs

    def create_job(self, row: dict[str, Any], first_event: str) -> dict[str, Any]:
        now = int(time.time())
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(created_at=now, status="validating_files", result_files=[],
                                              attempts=0, **row))
            _insert_event(conn, row["id"], first_event)
        return self.get_job(row["id"])  # type: ignore[return-value]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.begin() as conn:
            return _row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first())

    def fine_tuned_model(self, name: str) -> tuple[dict[str, Any], str] | None:
        """The job behind a fine-tuned model name and its adapter (a path under storage_root):
        a succeeded job's `fine_tuned_model`, or a `fine_tuned_model_checkpoint` of any job."""
        with self.engine.begin() as conn:
            job = _row(conn.execute(
                sa.select(jobs).where(jobs.c.fine_tuned_model == name, jobs.c.status == "succeeded")).first())
            if job is not None and (job["lineage"] or {}).get("adapter"):
                return job, job["lineage"]["adapter"]
            ckpt = _row(conn.execute(
                sa.select(checkpoints).where(checkpoints.c.fine_tuned_model_checkpoint == name)).first())
            if ckpt is None:
                return None
            job = _row(conn.execute(sa.select(jobs).where(jobs.c.id == ckpt["job_id"])).first())
            return (job, ckpt["path"]) if job is not None else None

    def base_and_adapter(self, model: str) -> tuple[str, Path | None]:
        """What a job's `model` names: a base model as it is (registry name or folder), or an
        earlier job's fine-tuned model (or checkpoint), which a new job continues: then its
        base (followed down a chain of such jobs) and the adapter to start from.

        Raises ModelNotFoundError when `model` looks like a fine-tuned model name (`ft:...`) that
        no job made, or whose adapter is gone from storage."""
        found = self.fine_tuned_model(model)
        if found is None:
            if model.startswith("ft:"):
                raise ModelNotFoundError(
                    f"model '{model}' is not a fine-tuned model here: give a succeeded job's fine_tuned_model or a "
                    "checkpoint's fine_tuned_model_checkpoint (GET /v1/fine_tuning/jobs), or a base model")
            return model, None
        job, adapter = found
        try:
            path = self.local_dir(adapter)
        except StorageError as exc:
            raise ModelNotFoundError(f"model '{model}': {exc}") from None
        if not (path / ADAPTER_CONFIG_FILE).is_file():
            where = f"the server's storage and {self.shared.uri}" if self.shared else "the server's storage"
            raise ModelNotFoundError(f"model '{model}': its adapter {path} is gone from {where}")
        base, _ = self.base_and_adapter(job["model"])
        return base, path

    def list_jobs(self, after: str | None = None, limit: int = 20,
                  metadata_filter: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], bool]:
        with self.engine.begin() as conn:
            if not metadata_filter:
                return _page(conn, jobs, sa.select(jobs), after, limit, "desc")
            # Metadata is small; filter in Python so the same code serves SQLite and PostgreSQL.
            rows, _ = _page(conn, jobs, sa.select(jobs), after, 1_000_000, "desc")
            rows = [r for r in rows if all((r["metadata"] or {}).get(k) == v for k, v in metadata_filter.items())]
            return rows[:limit], len(rows) > limit

    def update_job(self, job_id: str, worker_id: str | None = None, event: str | None = None,
                   level: str = "info", **fields: Any) -> bool:
        """Update a job (only while `worker_id` still holds it, when given); log an event."""
        with self.engine.begin() as conn:
            q = jobs.update().where(jobs.c.id == job_id)
            if worker_id is not None:
                q = q.where(jobs.c.worker_id == worker_id)
            ok = conn.execute(q.values(**fields)).rowcount == 1 if fields else True
            if ok and event:
                _insert_event(conn, job_id, event, level=level)
            return ok

    def transition(self, job_id: str, allowed: Iterable[str], to: str, event: str,
                   **fields: Any) -> tuple[dict[str, Any] | None, bool]:
        """Move a job to `to` if its status is in `allowed`; return (job, changed)."""
        with self.engine.begin() as conn:
            job = _row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first())
            if job is None or job["status"] not in allowed:
                return job, False
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(status=to, **fields))
            _insert_event(conn, job_id, event)
            job.update(status=to, **fields)
            return job, True

    def claim_job(self, worker_id: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest job that needs a worker: new, queued, or held by a lapsed worker.

        Returns the job as it was before the claim (so `worker_id` names a lost worker
        when the job is being taken over), with the new holder set.
        """
        now = time.time()
        cutoff = now - lease_s
        lapsed = sa.or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < cutoff)
        waiting = sa.or_(
            sa.and_(jobs.c.status.in_(("validating_files", "queued")),
                    sa.or_(jobs.c.worker_id.is_(None), lapsed)),
            sa.and_(jobs.c.status == "running", lapsed),
        )
        q = sa.select(jobs).where(waiting).order_by(jobs.c.seq).limit(1).with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            job = _row(conn.execute(q).first())
            if job is None:
                return None
            conn.execute(
                jobs.update().where(jobs.c.id == job["id"]).values(
                    worker_id=worker_id, heartbeat_at=now, attempts=job["attempts"] + 1
                )
            )
            if job["worker_id"] and job["status"] == "running":
                _insert_event(
                    conn, job["id"],
                    f"Worker {job['worker_id']} stopped sending heartbeats; worker {worker_id} takes over "
                    "and resumes from the last checkpoint",
                    level="warn",
                )
        job["previous_worker_id"] = job["worker_id"]
        job["worker_id"] = worker_id
        return job

    def requeue_lapsed(self, lease_s: float) -> list[str]:
        """Queue again every job whose worker stopped heartbeating, so none stays "running".

        Any API node or worker calls this; the next worker to claim the job resumes it from
        its last checkpoint.
        """
        cutoff = time.time() - lease_s
        q = (sa.select(jobs.c.id, jobs.c.status, jobs.c.worker_id)
             .where(jobs.c.status.in_(("validating_files", "running")), jobs.c.worker_id.is_not(None),
                    jobs.c.heartbeat_at < cutoff)
             .with_for_update(skip_locked=True))
        with self.engine.begin() as conn:
            lapsed = [_row(r) for r in conn.execute(q)]
            for job in lapsed:
                to = "queued" if job["status"] == "running" else job["status"]
                conn.execute(jobs.update().where(jobs.c.id == job["id"])
                             .values(status=to, worker_id=None, heartbeat_at=None))
                _insert_event(conn, job["id"], f"Worker {job['worker_id']} stopped sending heartbeats; "
                              "the job is queued again and resumes from its last checkpoint", level="warn")
        return [j["id"] for j in lapsed]  # type: ignore[index]

    def heartbeat(self, job_id: str, worker_id: str, **fields: Any) -> str | None:
        """Renew the lease; return the job's status, or None if this worker lost the job."""
        with self.engine.begin() as conn:
            n = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .values(heartbeat_at=time.time(), **fields)
            ).rowcount
            if n != 1:
                return None
            return conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()

    def release(self, job_id: str, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.worker_id == worker_id)
                .values(worker_id=None, heartbeat_at=None)
            )

    def succeeded_jobs(self) -> list[dict[str, Any]]:
        with self.engine.begin() as conn:
            return [_row(r) for r in conn.execute(
                sa.select(jobs).where(jobs.c.status == "succeeded").order_by(jobs.c.seq)
            )]  # type: ignore[misc]

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as conn:
            _insert_event(conn, job_id, message, level=level, type=type, data=data)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        with self.engine.begin() as conn:
            return _page(conn, events, sa.select(events).where(events.c.job_id == job_id), after, limit, "desc")

    def last_metrics_step(self, job_id: str) -> int:
        """The last training step already reported as a metrics event (-1 if none)."""
        with self.engine.begin() as conn:
            data = conn.execute(
                sa.select(events.c.data).where(events.c.job_id == job_id, events.c.type == "metrics")
                .order_by(events.c.seq.desc()).limit(1)
            ).scalar()
        return int((data or {}).get("step") or -1)

    # ------------------------------------------------------------------ checkpoints

    def add_checkpoint(self, row: dict[str, Any]) -> bool:
        """Record a checkpoint once (a re-claimed job may see the same step again)."""
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(checkpoints.c.id).where(checkpoints.c.job_id == row["job_id"],
                                                  checkpoints.c.step == row["step"])
            ).first()
            if exists:
                return False
            conn.execute(checkpoints.insert().values(**row))
            return True

    def list_checkpoints(self, job_id: str, after: str | None = None,
                         limit: int = 10) -> tuple[list[dict[str, Any]], bool]:
        with self.engine.begin() as conn:
            q = sa.select(checkpoints).where(checkpoints.c.job_id == job_id)
            return _page(conn, checkpoints, q, after, limit, "desc")


def _insert_event(conn: Connection, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
    conn.execute(events.insert().values(
        id=new_id("ftevent"), job_id=job_id, created_at=int(time.time()), level=level,
        message=message, type=type, data=data,
    ))


def _page(conn: Connection, table: sa.Table, q: Any, after: str | None, limit: int,
          order: str) -> tuple[list[dict[str, Any]], bool]:
    """One page of `q` in insertion order (`desc`: newest first), starting after id `after`."""
    if after:
        seq = conn.execute(sa.select(table.c.seq).where(table.c.id == after)).scalar()
        if seq is None:
            raise UsageError(f"after='{after}' names no {table.name[:-1]}; pass an id from a previous page")
        q = q.where(table.c.seq < seq if order == "desc" else table.c.seq > seq)
    q = q.order_by(table.c.seq.desc() if order == "desc" else table.c.seq).limit(limit + 1)
    rows = [_row(r) for r in conn.execute(q)]
    return rows[:limit], len(rows) > limit  # type: ignore[return-value]


def open_store(url: str | None = None, settings: Settings | None = None) -> JobStore:
    """Open (and migrate) the jobs database; files live under $TUNESMITH_HOME, and also in
    settings.storage when one is given."""
    settings = settings or Settings.from_env()
    shared = SharedStorage(settings.storage, settings.home) if settings.storage else None
    engine = build_engine(url or default_db_url(settings))
    try:
        migrate(engine)
    except sa.exc.OperationalError as exc:
        raise UsageError(
            f"cannot open the jobs database {engine.url.render_as_string(hide_password=True)}: "
            f"{str(exc.orig).strip().splitlines()[0]}; check --db and that the server is running"
        ) from None
    return JobStore(engine, settings.home, shared)
