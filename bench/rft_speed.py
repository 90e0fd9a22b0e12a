"""Reinforcement fine-tuning speed: tunesmith's GRPO vs TRL's GRPOTrainer, same model, LoRA, prompts,
group size, answer length and precision, in one invocation.

    .venv/bin/pip install 'trl>=1.16,<1.17' 'datasets>=5.2,<6'     # the bench extra's RFT part
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/rft_speed.py --steps 4
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/rft_speed.py --steps 2 --only tunesmith

Each contender runs in its own child process and prints one JSON line; the parent prints a
markdown table. Both train LoRA r=16 (alpha 32, all linear layers) on SmolLM2-135M-Instruct,
on the same banking77 prompts (the user message is the text, the reward 1 when the answer is
the label: a string_check grader for tunesmith, the same comparison as a reward function for
TRL), --prompts prompts per step with --group-size answers each, at most --max-tokens tokens
per answer, temperature 1, lr 1e-4, no KL term (TRL's beta 0), one update per batch, TRL's
token-level "dapo" loss (tunesmith's normalisation), bf16 where the CPU has it.

samples/s: answers sampled, graded and trained on per second of whole steps (sampling, grading
and the update), over every step but the first (steady speed: both allocate buffers, TRL
builds its generation config, there). trained tokens/s: the answer tokens trained on per
second, on the same steps. Answers are as long as the sampled text makes them, so the two
columns can rank the contenders differently when one samples longer answers.
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

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77" / "train.csv"
MODEL = "smollm2-135m-instruct"
SEED = 42
LR = 1e-4


def prompts(n: int) -> list[dict]:
    """n banking77 rows spread over the intents (every 10th row): the prompt and its label."""
    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))[::10][:n]
    return [{"messages": [{"role": "user", "content": r["text"]}], "label": r["category"]} for r in rows]


def run_tunesmith(args: argparse.Namespace, workdir: Path) -> dict:
    from tunesmith.models.registry import resolve_model
    from tunesmith.reinforce.run import train_rft
    from tunesmith.train.config import TrainConfig

    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts(args.prompts * args.steps)))
    grader = workdir / "grader.json"
    grader.write_text(json.dumps({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                                  "reference": "{{item.label}}", "operation": "eq"}))
    cfg = TrainConfig(method="reinforcement", model=str(resolve_model(MODEL).path), data=data, grader=grader,
                      batch_size=args.prompts, group_size=args.group_size, max_completion_tokens=args.max_tokens,
                      max_steps=args.steps, learning_rate=LR, warmup_ratio=0.0, seed=SEED, out=workdir / "run")
    train_rft(cfg, progress=False)
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [rows[0]["elapsed"]] + [b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:])]
    answers = args.prompts * args.group_size
    tokens = [r["completion_tokens"] * answers for r in rows]
    return _summary("tunesmith", seconds, answers, tokens, [r["reward_mean"] for r in rows])


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import has_bf16

    rows = [{"prompt": r["messages"], "label": r["label"]} for r in prompts(args.prompts * args.steps)]

    def label_reward(completions, label, **_):
        return [float(c[0]["content"].strip() == lab) for c, lab in zip(completions, label)]

    seconds: list[float] = []
    logs: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                logs_seen.append(dict(logs))

    logs_seen = logs
    answers = args.prompts * args.group_size
    cfg = GRPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=answers,
                     num_generations=args.group_size, max_completion_length=args.max_tokens, max_steps=args.steps,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, beta=0.0, loss_type="dapo",
                     temperature=1.0, logging_steps=1, report_to=[], seed=SEED, bf16=has_bf16(), use_cpu=True,
                     save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(SEED)
    trainer = GRPOTrainer(model=str(resolve_model(MODEL).path), reward_funcs=label_reward, args=cfg,
                          train_dataset=Dataset.from_list(rows), peft_config=lora, callbacks=[Clock()])
    trainer.train()
    tokens = [lg["completions/mean_length"] * answers for lg in logs]
    return _summary("TRL GRPOTrainer", seconds, answers, tokens, [lg.get("reward", 0.0) for lg in logs])


def _summary(name: str, seconds: list[float], answers: int, tokens: list[float], rewards: list[float]) -> dict:
    steady = seconds[1:] or seconds
    steady_tokens = tokens[1:] or tokens
    return {"name": name, "steps": len(seconds), "first_step_s": round(seconds[0], 2),
            "samples_per_s": round(answers * len(steady) / sum(steady), 3),
            "trained_tokens_per_s": round(sum(steady_tokens) / sum(steady), 2),
            "mean_answer_tokens": round(sum(tokens) / max(1, len(tokens)) / answers, 1),
            "reward_mean": round(sum(rewards) / max(1, len(rewards)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["tunesmith", "trl"])
    ap.add_argument("--child", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_tunesmith if args.child == "tunesmith" else run_trl)(args, Path(tmp))
        print("RESULT " + json.dumps(result), flush=True)
        return
    from tunesmith.models.hardware import detect_machine

    print(f"machine: {detect_machine().describe()}; load average {os.getloadavg()[0]:.1f}; "
          f"{args.steps} steps of {args.prompts} prompts x {args.group_size} answers, <= {args.max_tokens} tokens")
    results = []
    for who in ([args.only] if args.only else ["tunesmith", "trl"]):
        cmd = [sys.executable, __file__, "--child", who, "--steps", str(args.steps), "--prompts", str(args.prompts),
               "--group-size", str(args.group_size), "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{who} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1][len("RESULT "):]))
    print("| contender | samples/s | trained tokens/s | mean answer tokens | first step s | mean reward |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['samples_per_s']} | {r['trained_tokens_per_s']} | {r['mean_answer_tokens']} | "
              f"{r['first_step_s']} | {r['reward_mean']} |")
    if len(results) == 2:
        print(f"tunesmith / TRL: {results[0]['samples_per_s'] / results[1]['samples_per_s']:.2f}x samples/s, "
              f"{results[0]['trained_tokens_per_s'] / results[1]['trained_tokens_per_s']:.2f}x trained tokens/s")


if __name__ == "__main__":
    main()
