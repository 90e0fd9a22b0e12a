"""`tunesmith worker`: bad options are one sentence; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def test_bad_db_url_is_a_sentence_not_a_traceback():
    from in_process import run_tunesmith  # in this process; the next test runs the real worker

    r = run_tunesmith("worker", "--db", "mysql://x/y")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --db 'mysql://x/y' is not supported") and "Traceback" not in r.stderr


def test_worker_polls_and_stops_on_sigterm(_isolated_home):
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "worker", "--poll-interval-s", "0.2"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while not (_isolated_home / "tunesmith.db").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"polling sqlite:///{_isolated_home / 'tunesmith.db'}" in err
