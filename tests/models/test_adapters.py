"""resolve_adapter: which adapter of a run `best`, `last` and `step-N` pick."""

from __future__ import annotations

import pytest

from tunesmith.errors import UsageError
from tunesmith.models.adapters import resolve_adapter


def _adapter(folder, state=True):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    if state:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_best_last_and_step_n(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _adapter(ckpts / "step-000040")
    _adapter(ckpts / "step-000120")
    _adapter(ckpts / "step-000200", state=False)  # an adapter counts without its training state
    (ckpts / "best.json").write_text('{"step": 40, "valid_loss": 1.0}')
    # No adapter/ yet (a run stopped before it finished): best falls back to the last checkpoint.
    assert resolve_adapter(run) == ckpts / "step-000200"
    published = _adapter(run / "adapter", state=False)
    assert resolve_adapter(run) == published
    assert resolve_adapter(run, "last") == ckpts / "step-000200"
    assert resolve_adapter(run, "step-40") == ckpts / "step-000040"
    assert resolve_adapter(run, "step-000120") == ckpts / "step-000120"
    assert resolve_adapter(ckpts / "step-000120", "last") == ckpts / "step-000120"  # an adapter dir is itself


def test_a_missing_step_names_the_ones_there_are(tmp_path):
    run = tmp_path / "run"
    _adapter(run / "checkpoints" / "step-000040")
    (run / "checkpoints" / "best.json").write_text('{"step": 40, "valid_loss": 1.0}')
    for missing in ("step-41", "step-abc"):
        with pytest.raises(UsageError, match=f"has no checkpoint {missing}; it has: step-000040$"):
            resolve_adapter(run, missing)


def test_a_run_without_an_adapter_says_so(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds no adapter"):
        resolve_adapter(tmp_path / "run")
    with pytest.raises(UsageError, match="does not exist"):
        resolve_adapter(tmp_path / "elsewhere")
