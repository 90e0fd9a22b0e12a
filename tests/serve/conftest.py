"""Fixtures for the serving tests: three peft adapters on the tiny model, an engine with
them loaded, and a live uvicorn server on loopback for the official openai client."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from serve_helpers import ADAPTERS, live_server, make_adapter


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=i) for i, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dirs):
    from tunesmith.generate.engine import LocalEngine

    eng = LocalEngine.load(str(tiny_model_dir), [(n, p) for n, p in adapter_dirs.items()])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory) -> Iterator[str]:
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), api_key=None)
    with live_server(create_app(engine, settings)) as url:
        yield url


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
