"""Fixtures for the serving tests: a live uvicorn server on loopback, over the shared
`engine` fixture (tests/conftest.py), for the official openai client."""

from __future__ import annotations

from typing import Iterator

import pytest
from serve_helpers import live_server


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory) -> Iterator[str]:
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    # Tests add adapters they make in their own tmp_path: all of pytest's temporary folders are
    # allowed; the graders tests run python graders, which a server runs only when allowed.
    settings = Settings(home=tmp_path_factory.mktemp("home"), api_key=None,
                        allowed_paths=(tmp_path_factory.getbasetemp(),), python_graders=True)
    with live_server(create_app(engine, settings)) as url:
        yield url


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
