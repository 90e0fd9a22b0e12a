"""`tunesmith eval` on the real SmolLM2: its chat template, its end-of-turn stop and its
reference loss, on a few real banking77 rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from eval_helpers import run_cli

BANKING77 = Path(__file__).resolve().parents[2] / "data" / "banking77" / "test.csv"


@pytest.mark.slow
def test_eval_smollm2_stops_at_end_of_turn_and_reports_a_real_loss(smollm2, tmp_path):
    with open(BANKING77, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:6]
    test = tmp_path / "test.csv"
    with open(test, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    out = tmp_path / "ev"
    proc = run_cli("eval", "--model", smollm2, "--data", test, "--out", out, "--max-new-tokens", "24",
                   "--metric", "label")
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == [r["category"] for r in rows]
    for p in preds:
        assert "<|im_end|>" not in p["prediction"] and "<|im_start|>" not in p["prediction"]
        assert 0 < p["completion_tokens"] <= 24
    m = json.loads((out / "metrics.json").read_text())
    # The base model has never seen these labels: a loss far above zero but finite, and a
    # perplexity that is exp(loss).
    assert 0.5 < m["loss"] < 20 and m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-4)
    assert m["prompt_tokens_per_example"] > 10
