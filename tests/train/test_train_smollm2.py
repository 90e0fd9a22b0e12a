"""The real SmolLM2-135M-Instruct: targets through its own template, and one real step."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunesmith.data.render import IGNORE_INDEX
from tunesmith.train.config import TrainConfig

# The copy bundled with the repository (a subset of ../shared/data/banking77, CC-BY-4.0).
BANKING = Path(__file__).resolve().parents[2] / "data" / "banking77" / "train.csv"


@pytest.mark.slow
def test_smollm2_one_step_on_banking77(smollm2, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.example import chat
    from tunesmith.train import data as td
    from tunesmith.train.run import train

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    kept, _ = td.render_and_filter(tok, [chat(("user", "Where is my card?"), ("assistant", "card_arrival"))], 512, "x")
    batch = td.collate(kept, True, tok.pad_token_id)
    targets = batch["targets"][0]
    assert tok.decode(targets[targets != IGNORE_INDEX]) == "card_arrival<|im_end|>"

    with open(BANKING, newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    data = tmp_path / "train.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    result = train(TrainConfig(model=str(smollm2), data=data, output_column="category", out=tmp_path / "run",
                               max_steps=1, batch_size=4), progress=False)
    assert result.steps == 1 and result.metrics["train_loss"] > 0
    base = AutoModelForCausalLM.from_pretrained(str(smollm2))
    PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))


@pytest.mark.slow
def test_smollm2_dpo_steps_on_the_example_pairs(smollm2, tmp_path):
    """A few DPO steps on the real model and the bundled example pairs, at the default
    precision (bf16 where the CPU has it): the first step is log(2) (the reference pass lays
    the pairs out as the first epoch's steps do, so bf16 rounds both alike; before it did,
    step 1 measured 0.6854 here), and the training pairs' validation reward accuracy and margin
    rise above the start."""
    import math

    from tunesmith.train.run import train

    pairs = Path(__file__).resolve().parents[2] / "examples" / "preference.jsonl"
    result = train(TrainConfig(model=str(smollm2), data=pairs, validation=pairs, method="dpo", out=tmp_path / "run",
                               max_steps=6, batch_size=4, learning_rate=5e-4, eval_every_steps=3), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["train_loss"] - math.log(2)) < 1e-6, rows[0]
    evaluated = [r for r in rows if r["valid_loss"] is not None]
    assert len(evaluated) == 2 and evaluated[-1]["valid_loss"] < math.log(2)
    assert evaluated[-1]["valid_reward_margin"] > 0 and evaluated[-1]["valid_reward_accuracy"] >= 0.7, evaluated
    assert result.metrics["rewards_chosen"] is not None
