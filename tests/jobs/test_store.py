"""The jobs store on SQLite (always) and PostgreSQL (when a server can be started here)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from jobs_helpers import postgres_server, postgres_url  # noqa: F401 (fixtures)

from tunesmith.jobs.store import MIGRATIONS, new_id, open_store


def _job(store, **kw):
    row = {"id": new_id("ftjob"), "model": "m", "training_file": "file-x", "method": {"type": "supervised"},
           "seed": 1, **kw}
    return store.create_job(row, first_event="Created")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, _isolated_home):
    if request.param == "sqlite":
        s = open_store()
    else:
        url = request.getfixturevalue("postgres_url")
        s = open_store(url)
    yield s
    s.close()


def test_schema_is_versioned_and_migrations_are_idempotent(store):
    again = open_store(store.url if store.dialect == "postgresql" else None)
    with again.engine.begin() as conn:
        versions = [r[0] for r in conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version"))]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    again.close()


def test_claim_is_atomic_across_threads(store):
    jobs = [_job(store) for _ in range(3)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        while True:
            job = store.claim_job(f"w{i}", lease_s=60)
            if job is None:
                return
            with lock:
                claimed.append(job["id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j["id"] for j in jobs)  # each job exactly once


def test_lapsed_heartbeat_makes_a_running_job_claimable_again(store):
    job = _job(store)
    assert store.claim_job("w1", lease_s=60)["id"] == job["id"]
    store.update_job(job["id"], status="running")
    assert store.claim_job("w2", lease_s=60) is None
    assert store.heartbeat(job["id"], "w1") == "running"
    time.sleep(1.2)
    taken = store.claim_job("w2", lease_s=1.0)
    assert taken["id"] == job["id"] and taken["previous_worker_id"] == "w1"
    assert store.heartbeat(job["id"], "w1") is None  # the old worker learns it lost the job
    events, _ = store.list_events(job["id"])
    assert "takes over" in events[0]["message"] and events[0]["level"] == "warn"


def test_a_lapsed_running_job_is_queued_again(store):
    job = _job(store)
    store.claim_job("w1", lease_s=60)
    store.update_job(job["id"], status="running")
    assert store.requeue_lapsed(lease_s=60) == []
    time.sleep(1.2)
    assert store.requeue_lapsed(lease_s=1.0) == [job["id"]]
    got = store.get_job(job["id"])
    assert got["status"] == "queued" and got["worker_id"] is None
    assert store.claim_job("w2", lease_s=60)["id"] == job["id"]


def test_transitions_only_from_allowed_states(store):
    job = _job(store)
    _, changed = store.transition(job["id"], ["running"], "paused", "Paused")
    assert not changed
    got, changed = store.transition(job["id"], ["validating_files"], "cancelled", "Cancelled", finished_at=5)
    assert changed and got["status"] == "cancelled" and store.get_job(job["id"])["finished_at"] == 5


def test_pagination_newest_first(store):
    ids = [_job(store)["id"] for _ in range(5)]
    first, more = store.list_jobs(limit=2)
    assert [j["id"] for j in first] == ids[::-1][:2] and more
    second, more = store.list_jobs(after=first[-1]["id"], limit=10)
    assert [j["id"] for j in second] == ids[::-1][2:] and not more


def test_sqlite_is_in_wal_mode_under_home(_isolated_home):
    s = open_store()
    assert (_isolated_home / "tunesmith.db").is_file()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_unreachable_database_is_a_sentence():
    from tunesmith.errors import UsageError

    with pytest.raises(UsageError, match="cannot open the jobs database"):
        open_store("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(UsageError, match="not supported"):
        open_store("mysql://x/y")


def test_a_database_from_before_integrations_gains_the_columns(tmp_path):
    """A database made by the first schema (no integrations, no overrides) is migrated in place."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN integrations"))
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN overrides"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version > 1"))
    store.close()
    store = open_store(url)
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("jobs")}
    assert {"integrations", "overrides"} <= columns
    store.close()
