"""MetricsTail: the worker's reader of a run's metrics.jsonl."""

from __future__ import annotations

import json

from tunesmith.jobs.run_reader import MetricsTail


def _append(path, *steps):
    with open(path, "a") as fh:
        for s in steps:
            fh.write(json.dumps({"step": s, "train_loss": 1.0 / s}) + "\n")


def test_a_row_read_for_a_checkpoint_is_still_handed_out_once(tmp_path):
    """The worker reads a checkpoint's metrics (at_step) between publishing rows (new_rows): a
    row that arrived in between must still be published, exactly once. It was lost, and a job's
    last step went missing from its events now and then."""
    path = tmp_path / "metrics.jsonl"
    _append(path, 1, 2)
    tail = MetricsTail(path)
    assert [r["step"] for r in tail.new_rows()] == [1, 2]
    _append(path, 3)
    assert tail.at_step(3)["step"] == 3
    assert [r["step"] for r in tail.new_rows()] == [3]
    assert tail.new_rows() == []
