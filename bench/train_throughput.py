"""Training throughput: tunesmith vs TRL's SFTTrainer, same LoRA, data, batch and precision.

    .venv/bin/pip install -e '.[bench]'
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_throughput.py --steps 10
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_throughput.py --steps 3 --only tunesmith

Each contender runs in its own child process (so peak RSS is its own) and prints one JSON
line; the parent prints a markdown table. Tokens/s counts the non-padding input tokens the
model trained on per second of training. MFU = 4 x parameters x tokens / time (attention left out: small for ~60-token rows),
divided by the bf16 matmul peak measured at the start of this same invocation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"  # ../shared beside the repo
MODEL = "smollm2-135m-instruct"


def bf16_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def rows(n: int) -> list[dict]:
    with open(DATA, newline="") as fh:
        return list(csv.DictReader(fh))[:n]


def run_tunesmith(args) -> dict:
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "train.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows(args.rows))
    cfg = TrainConfig(model=MODEL, data=data, output_column="category", out=tmp / "run", max_steps=args.steps,
                      batch_size=args.batch_size, max_seq_len=args.max_seq_len, precision=args.precision)
    result = train(cfg, progress=False)
    return {"tokens_per_s": result.metrics["tokens_per_s"], "final_loss": result.metrics["train_loss"],
            "train_time_s": result.metrics["train_time_s"]}


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.registry import resolve_model

    path = str(resolve_model(MODEL).path)
    tok = AutoTokenizer.from_pretrained(path)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["text"]}],
                             "completion": [{"role": "assistant", "content": r["category"]}]} for r in rows(args.rows)])
    sft = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03, max_length=args.max_seq_len,
                    bf16=args.precision == "bf16", logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, seed=42, packing=args.trl_packing)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=lora)
    out = trainer.train()
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    tokens = sum(lengths) / len(lengths) * args.batch_size * args.steps
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / out.metrics["train_runtime"], "final_loss": losses[-1] if losses else None,
            "train_time_s": out.metrics["train_runtime"]}


def child(args) -> None:
    result = run_tunesmith(args) if args.worker == "tunesmith" else run_trl(args)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--only", choices=["tunesmith", "trl"])
    p.add_argument("--worker", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--trl-packing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        child(args)
        return
    peak = bf16_peak_gflops()
    n_params = 134.5e6
    contenders = [("tunesmith", "auto", False), ("trl", "fp32", False), ("trl", "bf16", False), ("trl", "bf16", True)]
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s; steps {args.steps}, batch {args.batch_size}, max length {args.max_seq_len}")
    print("| contender | precision | tokens/s | peak RSS (GB) | final loss | MFU |\n|---|---|---|---|---|---|")
    for name, precision, packing in contenders:
        if args.only and name != args.only:
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--precision", precision, "--steps", str(args.steps),
               "--rows", str(args.rows), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
        if packing:
            cmd.append("--trl-packing")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        label = name + (" (packing)" if packing else "")
        if status != 0 or not found:
            print(f"| {label} | {precision} | failed (exit {status >> 8}) | | | |")
            continue
        r = json.loads(found[0][len("RESULT "):])
        mfu = 4 * n_params * r["tokens_per_s"] / (peak * 1e9)
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        print(f"| {label} | {precision} | {r['tokens_per_s']:.0f} | {usage.ru_maxrss / 1e6:.2f} | {loss} | {mfu:.1%} |", flush=True)


if __name__ == "__main__":
    main()
