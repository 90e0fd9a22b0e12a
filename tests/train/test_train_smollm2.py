"""The real SmolLM2-135M-Instruct: targets through its own template, and one real step."""

from __future__ import annotations

import csv
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
