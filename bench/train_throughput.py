"""Training throughput and loss parity: tunesmith vs TRL's SFTTrainer, same LoRA, data, order and schedule.

    .venv/bin/pip install -e '.[bench]'
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_throughput.py --steps 10
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_throughput.py --steps 3 --only tunesmith

Each contender runs in its own child process (so peak RSS is its own) and prints one JSON
line; the parent prints a markdown table.

What makes the losses comparable (the issue asks for the same loss within 2%):
- the same tokens: TRL gets tunesmith's own rendering (input ids and loss labels, a
  pre-tokenized dataset TRL uses as is), so both train on the answer and `<|im_end|>`
  and nothing else (TRL's own prompt/completion path also trains the newline after it);
- the same examples in the same order: TRL's dataset is tunesmith's step-by-step order
  (train.data.plan_step), read sequentially;
- the same schedule: peak lr 1e-3, cosine to 0, no warm-up (the two libraries define a
  warm-up step differently), AdamW (0.9, 0.999, eps 1e-8), no weight decay, clipping at 1;
- the same LoRA initialisation: the seed is set right before peft wraps the model on both
  sides, so the A matrices start from the same draws (B starts at zero).
The loss column is the mean training loss over the last k steps (--last-k), and "vs
tunesmith" its relative difference. TRL with packing trains differently composed batches,
so its loss is shown but not a parity check.

Tokens/s counts the non-padding input tokens trained per second over every step but the
first (steady speed); the first step's seconds are shown apart, since tunesmith compiles
its layers there (torch.compile, once per run) and both libraries allocate buffers. MFU = model
FLOPs (4 x parameters per token for frozen-base LoRA, plus attention: 12 x layers x width x
the mean causal context) x tokens/s, divided by the matmul peak measured at the start
of this same invocation in the precision training runs in (bf16 with bf16 hardware, else
fp32; at most ~3 s, so a CPU that would emulate bf16 never stalls it). The first line says
the machine (CPU class as `tunesmith train` detects it); without bf16 hardware the TRL bf16
contenders are left out (emulated bf16 is slower than fp32, which TRL runs too). tunesmith runs the LM head only where there are labels, so it does
fewer FLOPs than this model count: MFU is model FLOPs, not the FLOPs executed.
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

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77" / "train.csv"  # the copy bundled with the repo
MODEL = "smollm2-135m-instruct"
SEED = 42
LR = 1e-3


def matmul_peak_gflops(dtype_name: str, budget_s: float = 3.0) -> float:
    """Best of repeated n x n matmuls in `dtype_name`, n halved until one takes < budget/10."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    n = 2048
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        a @ b
        if time.perf_counter() - t < budget_s / 10 or n <= 256:
            break
        n //= 2
    best, end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def write_rows(n: int, path: Path) -> Path:
    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    return path


def tunesmith_order(args, data: Path) -> list:
    """The rendered examples of each step, in tunesmith's order (steps x batch rows)."""
    from tunesmith.data.formats import ColumnMapping
    from tunesmith.models.registry import load_tokenizer, resolve_model
    from tunesmith.train import data as td

    tok = load_tokenizer(resolve_model(MODEL))
    examples, _ = td.render_and_filter(tok, td.load_examples(data, None, ColumnMapping("text", "category", None)),
                                       args.max_seq_len, str(data))
    return [examples[i] for s in range(args.steps) for i in td.plan_step(len(examples), args.batch_size, SEED, s)[1]]


def run_tunesmith(args, data: Path) -> dict:
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    out = data.parent / "run"
    cfg = TrainConfig(model=MODEL, data=data, output_column="category", out=out, max_steps=args.steps,
                      batch_size=args.batch_size, max_seq_len=args.max_seq_len, precision=args.precision,
                      learning_rate=LR, warmup_ratio=0.0, seed=SEED, compile=args.compile)
    result = train(cfg, progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    # elapsed at each step's end; checkpoints are only written after the last step
    return {"losses": [r["train_loss"] for r in rows], "step_ends": [r["elapsed"] for r in rows],
            "train_time_s": result.metrics["train_time_s"], "compiled": bool(result.metrics.get("compile_s"))}


def run_trl(args, data: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.registry import resolve_model

    path = str(resolve_model(MODEL).path)
    tok = AutoTokenizer.from_pretrained(path)
    ordered = tunesmith_order(args, data)
    ds = Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in ordered])
    sft = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    max_length=args.max_seq_len, bf16=args.precision == "bf16", logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=SEED, packing=args.trl_packing,
                    train_sampling_strategy="sequential")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(SEED)  # as tunesmith does before peft draws the LoRA A matrices
    model = get_peft_model(model, lora)
    step_ends: list[float] = []

    class StepClock(TrainerCallback):  # the wall time at each optimizer step's end
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter() - self.t0)

    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, callbacks=[StepClock()])
    out = trainer.train()
    # The rows TRL trained on, as it batched them (with packing, a row holds several examples).
    rows = trainer.train_dataset["input_ids"][: args.steps * args.batch_size]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_ends": step_ends, "train_time_s": out.metrics["train_runtime"],
            "step_tokens": [sum(len(x) for x in rows[i * args.batch_size:(i + 1) * args.batch_size])
                            for i in range(args.steps)] if args.trl_packing else None}


def model_flops_per_token(mean_len: float) -> float:
    """Frozen-base LoRA: forward 2N + backward to activations 2N, plus causal attention."""
    from tunesmith.models.registry import resolve_model

    cfg = json.loads((Path(resolve_model(MODEL).path) / "config.json").read_text())
    n_params = 134.5e6
    attention = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_len / 2
    return 4 * n_params + attention


def child(args) -> None:
    data = write_rows(args.rows, Path(tempfile.mkdtemp()) / "train.csv")
    result = run_tunesmith(args, data) if args.worker == "tunesmith" else run_trl(args, data)
    ordered = tunesmith_order(args, data)
    result["mean_len"] = sum(len(t.input_ids) for t in ordered) / len(ordered)
    if not result.get("step_tokens"):  # without TRL's packing both train exactly these rows per step
        b = args.batch_size
        result["step_tokens"] = [sum(len(t.input_ids) for t in ordered[i * b:(i + 1) * b]) for i in range(args.steps)]
    ends = result["step_ends"]
    # Steady speed: every step but the first (tunesmith's first step may include compiling,
    # and both libraries allocate their buffers then); the first step is reported apart.
    result["tokens_per_s"] = sum(result["step_tokens"][1:]) / (ends[-1] - ends[0])
    result["first_step_s"] = ends[0]
    print("RESULT " + json.dumps(result), flush=True)


def last_k_mean(losses: list[float], k: int) -> float | None:
    tail = [x for x in losses[-k:] if x is not None]
    return sum(tail) / len(tail) if tail else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--last-k", type=int, default=5, help="Compare the mean training loss of the last k steps.")
    p.add_argument("--only", choices=["tunesmith", "trl"])
    p.add_argument("--worker", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--compile", default="on", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--trl-packing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        child(args)
        return
    from tunesmith.models.hardware import detect_machine

    machine = detect_machine()
    trained_in = "bf16" if machine.bf16 else "fp32"
    peak = matmul_peak_gflops(trained_in)
    contenders = [("tunesmith", "auto", False, "on"), ("tunesmith", "auto", False, "off"), ("trl", "fp32", False, "off")]
    if machine.bf16:
        contenders += [("trl", "bf16", False, "off"), ("trl", "bf16", True, "off")]
    k = min(args.last_k, args.steps)
    print(f"machine: {machine.describe()}; tunesmith trains in {trained_in}")
    print(f"{trained_in} matmul peak: {peak:.0f} GFLOP/s; steps {args.steps}, batch {args.batch_size}, "
          f"max length {args.max_seq_len}, loss = mean of the last {k} steps")
    print("| contender | precision | tokens/s | first step (s) | peak RSS (GB) | first-step loss | loss | vs tunesmith "
          "| MFU |\n|---|---|---|---|---|---|---|---|---|")
    reference = None
    for name, precision, packing, compile_ in contenders:
        if args.only and name != args.only:
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--precision", precision, "--compile", compile_,
               "--steps", str(args.steps),
               "--rows", str(args.rows), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
        if packing:
            cmd.append("--trl-packing")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        label = name + (" (packing)" if packing else "")
        if status != 0 or not found:
            print(f"| {label} | {precision} | failed (exit {status >> 8}) | | | | | | |")
            continue
        r = json.loads(found[0][len("RESULT "):])
        loss = last_k_mean(r["losses"], k)
        if name == "tunesmith" and reference is None:
            reference = loss
        diff = "-" if reference is None or loss is None or loss is reference else f"{(loss - reference) / reference:+.1%}"
        if packing and diff != "-":
            diff += " (other batches)"
        mfu = model_flops_per_token(r["mean_len"]) * r["tokens_per_s"] / (peak * 1e9)
        first = f"{r['losses'][0]:.4f}" if r["losses"] else "-"
        shown = f"{loss:.4f}" if loss is not None else "-"
        if r.get("compiled"):
            label += " (compiled)"
        print(f"| {label} | {precision} | {r['tokens_per_s']:.0f} | {r['first_step_s']:.1f} | {usage.ru_maxrss / 1e6:.2f} "
              f"| {first} | {shown} "
              f"| {diff} | {mfu:.1%} |", flush=True)


if __name__ == "__main__":
    main()
