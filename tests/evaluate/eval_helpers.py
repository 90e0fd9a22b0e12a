"""Test helpers for the evaluation stage: adapters made directly with peft, small label data
sets, and the real CLI in a subprocess (the tiny model whose greedy outputs vary is in
tests/tiny_model.py); the engine tests' check of a constrained answer re-exported."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

GENERATE_TESTS = Path(__file__).resolve().parent.parent / "generate"
if str(GENERATE_TESTS) not in sys.path:  # imported by name, as tests/serve does
    sys.path.insert(0, str(GENERATE_TESTS))

from generate_helpers import starts_a_match  # noqa: E402,F401

LABELS = ["card_arrival", "exchange_rate", "card_linking"]


def make_adapter(base_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter on the model in base_dir, with random non-zero B (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=gen)
    peft_model.save_pretrained(str(out))
    return out


def write_label_csv(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for i in range(n):
            w.writerow([f"{prefix} {i}: my card {LABELS[i % 3].replace('_', ' ')}?", LABELS[i % 3]])
    return path


def write_metrics_jsonl(run: Path, steps: int = 10) -> Path:
    """A hand-written training log in the train stage's layout (metrics.jsonl + run.json)."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as fh:
        for s in range(1, steps + 1):
            row = {"step": s, "epoch": s / steps, "train_loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 200.0, "elapsed": s * 1.5}
            if s % 5 == 0:
                row["valid_loss"] = 3.2 / s
                row["token_accuracy"] = 0.1 * s
            fh.write(json.dumps(row) + "\n")
    (run / "run.json").write_text(json.dumps({"config": {"model": "tiny", "system": "Classify the query.", "lora_rank": 16}}))
    return run


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `tunesmith` command line in a child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from tunesmith.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )
