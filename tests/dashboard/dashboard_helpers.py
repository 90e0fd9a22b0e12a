"""Shared by the dashboard tests: a real server (tiny model, jobs API, worker, dashboard) on
loopback, and Debian's Chromium driven by Playwright (skipped, with the reason, without it).

Imported by name like tests/jobs' helpers, so no second conftest.py shadows the root one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS = Path(__file__).resolve().parent.parent
for helper_dir in (TESTS / "jobs", TESTS / "serve"):  # reuse their live-server helpers
    if str(helper_dir) not in sys.path:
        sys.path.insert(0, str(helper_dir))

from jobs_helpers import start_uvicorn, wait_for, write_chat_jsonl  # noqa: E402,F401
from serve_helpers import make_adapter  # noqa: E402,F401

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = TESTS.parent / "test-output" / "dashboard"


@dataclass
class Server:
    url: str
    engine: Any
    service: Any
    client: Any
    """openai.OpenAI pointed at the server (with its key)."""


@pytest.fixture
def dashboard_server(_isolated_home, tiny_model_dir, tmp_path_factory):
    """Factory: `tunesmith serve`'s app (inference + jobs + dashboard) on the tiny model."""
    import openai

    from tunesmith.serve.dashboard import mount_dashboard
    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import WorkerConfig
    from tunesmith.serve.app import create_app
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.serve.jobs_api import JobsService
    from tunesmith.settings import Settings

    cleanups: list[Callable[[], None]] = []

    def make(api_key: str | None = None, adapters: tuple = (), workers: int = 1) -> Server:
        engine = LocalEngine.load(str(tiny_model_dir), list(adapters))
        cleanups.append(engine.close)
        service = JobsService(open_store(None), workers=workers, engine=engine,
                              path_roots=(_isolated_home, tmp_path_factory.getbasetemp()),
                              worker_config=WorkerConfig(poll_interval_s=0.3, lease_s=10, stop_timeout_s=20))
        # Tests add adapters they make in their own tmp_path through the models page.
        settings = Settings(home=_isolated_home, api_key=api_key, allowed_paths=(tmp_path_factory.getbasetemp(),))
        app = create_app(engine, settings, routers=[service.router])
        mount_dashboard(app)
        url, stop = start_uvicorn(app)
        cleanups.append(stop)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=60)
        return Server(url=url, engine=engine, service=service, client=client)

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian's package; never a downloaded browser."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it when it can): "
                    "the dashboard's browser tests cannot run")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'): the dashboard's browser tests cannot run")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab (own session storage); fails the test on a script error or a
    request the page's Content-Security-Policy refused."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    tab.on("console", lambda msg: problems.append(f"console: {msg.text}")
           if msg.type == "error" and "Content Security Policy" in msg.text else None)
    tab.on("dialog", lambda dialog: dialog.accept())  # confirm() of cancel / remove
    yield tab
    context.close()
    assert not problems, problems


def screenshot(tab, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path
