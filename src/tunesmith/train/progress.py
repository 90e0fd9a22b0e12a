"""Where a run reports to: metrics.jsonl always (each row also to the --report-to trackers), a
rich progress bar on a terminal, plain lines otherwise (what the jobs worker captures). Only
rank 0 reports.

    tail -f runs/first/metrics.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

METRIC_KEYS = ("step", "epoch", "train_loss", "valid_loss", "token_accuracy", "lr", "grad_norm", "tokens_per_s",
               "elapsed")
"""grad_norm: the gradient's total norm before clipping (--max-grad-norm)."""
DPO_METRIC_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                   "valid_reward_accuracy", "valid_reward_margin")
"""Added for --method dpo (see train.preference and docs/training.md)."""
RFT_METRIC_KEYS = ("reward_mean", "reward_std", "zero_variance_groups", "kl", "completion_tokens",
                   "truncated_completions", "grader_errors", "valid_reward", "samples_per_s", "sampling_s", "grading_s")
"""Added for --method reinforcement (see reinforce/ and docs/rft.md): the sampled answers' mean
reward and its spread, the share of prompt groups whose answers all scored the same (they teach
nothing), KL to the base, mean answer length in tokens, the share of answers cut at
--max-completion-tokens, answers the grader could not score, the held-out reward (every
--eval-every-steps and at the end), sampled answers per second, and the seconds of the step spent
sampling and grading (the rest is the update)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    path.write_text("".join(ln + "\n" for ln in kept))


class Reporter:
    """metrics.jsonl plus a progress display; `enabled=False` for ranks other than 0."""

    def __init__(self, metrics_path: Path, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 keys: tuple[str, ...] = METRIC_KEYS, on_row: Callable[[dict[str, Any]], None] | None = None):
        self.enabled = enabled
        self.on_row = on_row
        """Also given each row written (the run's trackers)."""
        self.keys = keys
        self.total = total_steps
        self.fh = open(metrics_path, "a") if enabled else None
        self.bar = None
        self.every = max(1, total_steps // 20)
        self.last_valid: float | None = None
        self.last_valid_acc: float | None = None
        if enabled and progress and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {k: row.get(k) for k in self.keys}
        self.fh.write(json.dumps(line) + "\n")
        self.fh.flush()
        if self.on_row is not None:
            self.on_row(line)
        if row.get("valid_loss") is not None:
            self.last_valid = row["valid_loss"]
            self.last_valid_acc = row.get("valid_reward_accuracy")
        info = (
            f"epoch {row['epoch']:.2f}  loss {row['train_loss']:.4f}"
            + (f"  reward acc {row['reward_accuracy']:.2f}" if row.get("reward_accuracy") is not None else "")
            + (f"  reward {row['reward_mean']:.3f}" if row.get("reward_mean") is not None else "")
            + (f"  held-out {row['valid_reward']:.3f}" if row.get("valid_reward") is not None else "")
            + (f"  val {self.last_valid:.4f}" if self.last_valid is not None else "")
            + (f" (acc {self.last_valid_acc:.2f})" if self.last_valid_acc is not None else "")
            + f"  {row['tokens_per_s']:.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=info)
        elif row["step"] % self.every == 0 or row["step"] == self.total or row.get("valid_loss") is not None:
            eta = row.get("eta_s")
            say(f"step {row['step']}/{self.total}  {info}" + (f"  eta {eta:.0f}s" if eta is not None else ""))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            say(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None
