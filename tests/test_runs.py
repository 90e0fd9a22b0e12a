"""tunesmith.runs: the run directory's names and its one checkpoint lister."""

from __future__ import annotations

import json

import pytest

from tunesmith.runs import (ADAPTER_CONFIG_FILE, STATE_FILE, checkpoint_dir, list_checkpoints, parse_step,
                            read_run_json)


def plant_run(run):
    """A run directory with the odd entries a real one can hold next to its checkpoints."""
    ckpts = run / "checkpoints"

    def folder(name, *files):
        (ckpts / name).mkdir(parents=True)
        for f in files:
            (ckpts / name / f).write_text("{}")

    folder("step-000120", ADAPTER_CONFIG_FILE, STATE_FILE)
    folder("step-000040", ADAPTER_CONFIG_FILE, STATE_FILE)
    folder("step-7", ADAPTER_CONFIG_FILE, STATE_FILE)  # unpadded: written by hand or an old version
    folder("step-000200", ADAPTER_CONFIG_FILE)  # the adapter without its training state
    folder("step-000300", STATE_FILE)  # a full fine-tuning checkpoint: no adapter_config.json
    folder(".tmp-step-000160-4242", ADAPTER_CONFIG_FILE, STATE_FILE)  # a save in progress
    folder("step-abc", ADAPTER_CONFIG_FILE, STATE_FILE)
    folder("step-000080.tmp", ADAPTER_CONFIG_FILE, STATE_FILE)  # the jobs worker's copy in progress
    (ckpts / "best.json").write_text(json.dumps({"step": 40, "valid_loss": 1.0}))
    (ckpts / "step-000090").write_text("not a folder")
    return run


def steps(found):
    return [(step, path.name) for step, path in found]


def test_the_lister_keeps_complete_step_folders_in_step_order(tmp_path):
    run = plant_run(tmp_path / "run")
    # By number: "step-7" sorts after "step-000120" as text, before it as a step.
    assert steps(list_checkpoints(run)) == [(7, "step-7"), (40, "step-000040"), (120, "step-000120"),
                                            (300, "step-000300")]


def test_the_lister_asks_for_the_files_the_caller_needs(tmp_path):
    run = plant_run(tmp_path / "run")
    assert steps(list_checkpoints(run, require=ADAPTER_CONFIG_FILE)) == [
        (7, "step-7"), (40, "step-000040"), (120, "step-000120"), (200, "step-000200")]
    assert steps(list_checkpoints(run, require=(ADAPTER_CONFIG_FILE, STATE_FILE))) == [
        (7, "step-7"), (40, "step-000040"), (120, "step-000120")]


def test_a_run_without_checkpoints_lists_none(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    (tmp_path / "run").mkdir()
    assert list_checkpoints(tmp_path / "run") == []
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder should be")
    assert list_checkpoints(tmp_path / "run") == []


def test_checkpoint_names_are_written_zero_padded_and_read_padded_or_not(tmp_path):
    assert checkpoint_dir(tmp_path, 120) == tmp_path / "checkpoints" / "step-000120"
    assert checkpoint_dir(tmp_path, 1234567).name == "step-1234567"
    assert parse_step("step-000120") == 120
    assert parse_step("step-7") == 7
    for not_a_step in ("step-", "step-abc", "step-12.tmp", ".tmp-step-000160-4242", "best.json", "step-+5", "Step-1"):
        assert parse_step(not_a_step) is None, not_a_step


def test_every_former_lister_sees_the_same_checkpoints(tmp_path):
    """train's resume point, the jobs worker's 'can resume' check and pruning all list through runs."""
    from tunesmith.jobs.run_reader import has_checkpoint
    from tunesmith.train.checkpoint import latest_checkpoint, prune_checkpoints

    run = plant_run(tmp_path / "run")
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000300"
    assert has_checkpoint(run)
    assert not has_checkpoint(tmp_path / "missing") and latest_checkpoint(tmp_path / "missing") is None

    prune_checkpoints(run)  # keeps the best (40) and the last two complete ones (120, 300)
    assert steps(list_checkpoints(run)) == [(40, "step-000040"), (120, "step-000120"), (300, "step-000300")]
    assert (run / "checkpoints" / "step-000200").is_dir()  # not a complete checkpoint: never pruned


def test_read_run_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {"model": "m"}}))
    assert read_run_json(tmp_path)["config"]["model"] == "m"
    with pytest.raises(FileNotFoundError):
        read_run_json(tmp_path / "nothing")
