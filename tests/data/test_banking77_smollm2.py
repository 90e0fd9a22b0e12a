"""The real model on the real data set: banking77 train.csv validates cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.data.formats import ColumnMapping
from tunesmith.data.validate import validate_data

FULL = Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77" / "train.csv"  # ../shared beside the repo
BUNDLED = Path(__file__).resolve().parents[2] / "data" / "banking77" / "train.csv"


@pytest.mark.slow
def test_banking77_train_with_smollm2(smollm2):
    path = FULL if FULL.is_file() else BUNDLED
    report = validate_data(path, model=str(smollm2), columns=ColumnMapping("text", "category"), estimate=False)
    assert report.errors == []
    expected = 10_003 if path == FULL else 3_075
    assert report.examples == expected
    assert len(report.stats["labels"]) == 77
    # The full file repeats four texts with the same intent; nothing else is flagged.
    assert {w.code for w in report.warnings} <= {"duplicate_example"}
    if path == FULL:
        assert [w.line for w in report.warnings] == [1292, 1732, 4606, 6977]
    tokens = report.stats["tokens_per_example"]
    # SmolLM2's template adds its default system prompt (~20 tokens) to every row.
    assert 30 < tokens["min"] <= tokens["p50"] <= tokens["p95"] <= tokens["max"] < 300
    trained = report.stats["trained_tokens_per_example"]
    assert trained["min"] >= 2  # at least one label token plus <|im_end|>
    assert report.stats["trained_tokens_per_epoch"] < report.stats["tokens_per_epoch"]
