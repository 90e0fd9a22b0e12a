"""Reading what the trainer leaves in a run directory: metrics, checkpoints, its log.

The worker never runs the trainer in its own process (it shares only the trainer's
constants); it watches the files `tunesmith train --out RUN`
writes (RUN/metrics.jsonl, RUN/run.json, RUN/checkpoints/step-N/) and the child's log.

    python -c "from tunesmith.jobs.run_reader import metrics_csv; print(metrics_csv('runs/first').decode())"
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from tunesmith.runs import TRAIN_METRICS_FILE, list_checkpoints, read_run_json
from tunesmith.train.progress import DPO_METRIC_KEYS, RFT_METRIC_KEYS

METRICS_CSV_FIELDS = ("step", "epoch", "train_loss", "train_accuracy", "valid_loss",
                      "valid_mean_token_accuracy", "learning_rate", "tokens_per_s", "elapsed_s")
"""OpenAI's columns; a dpo run's CSV adds DPO_METRIC_KEYS (rewards, margin, reward accuracy)."""


class MetricsTail:
    """Reads the complete lines appended to metrics.jsonl since the last call.

    A resumed trainer rewrites the file without the steps it will redo, so rows are
    deduplicated by step: only steps beyond the last one seen are new.
    """

    def __init__(self, path: Path, last_step: int = -1):
        self.path = path
        self.offset = 0
        self.last_step = last_step
        self.by_step: dict[int, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []
        """New rows read (e.g. by `at_step`) but not yet handed out by `new_rows`."""

    def new_rows(self) -> list[dict[str, Any]]:
        """The rows of steps beyond the last one handed out, each once."""
        self._read()
        rows, self.pending = self.pending, []
        return rows

    def _read(self) -> None:
        if not self.path.is_file():
            return
        size = self.path.stat().st_size
        if size < self.offset:
            self.offset = 0
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(row.get("step") or 0)
            self.by_step[step] = {**self.by_step.get(step, {}), **{k: v for k, v in row.items() if v is not None}}
            if step > self.last_step:
                self.last_step = step
                self.pending.append(row)

    def at_step(self, step: int) -> dict[str, Any]:
        """The metrics of `step` (or the last step before it). Rows it reads stay pending for
        `new_rows`: a row that arrived just now is still published as an event."""
        self._read()
        steps = [s for s in self.by_step if s <= step]
        return self.by_step[max(steps)] if steps else {}

    @staticmethod
    def total_steps(run_dir: Path) -> int | None:
        try:
            return int(read_run_json(run_dir)["resolved"]["total_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def eta(self, run_dir: Path) -> int | None:
        """Estimated finish (unix time) from the pace so far."""
        total = self.total_steps(run_dir)
        last = self.by_step.get(self.last_step, {})
        elapsed, step = last.get("elapsed"), last.get("step")
        if not total or not elapsed or not step:
            return None
        return int(time.time() + elapsed / step * max(0, total - step))


def metrics_csv(run_dir: Path) -> bytes:
    """The run's metrics as OpenAI's step-metrics CSV (a job's result file), with a dpo or
    reinforcement run's reward metrics in extra columns after OpenAI's."""
    rows = MetricsTail(Path(run_dir) / TRAIN_METRICS_FILE).new_rows()
    dpo = (DPO_METRIC_KEYS if any("reward_accuracy" in row for row in rows)
           else RFT_METRIC_KEYS if any("reward_mean" in row for row in rows) else ())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(METRICS_CSV_FIELDS + dpo)
    for row in rows:
        # The trainer's token_accuracy is measured on the validation set; it has no training accuracy.
        writer.writerow(["" if v is None else v for v in (
            row.get("step"), row.get("epoch"), row.get("train_loss"), None,
            row.get("valid_loss"), row.get("token_accuracy"), row.get("lr"), row.get("tokens_per_s"),
            row.get("elapsed"), *(row.get(k) for k in dpo))])
    return buf.getvalue().encode()


def has_checkpoint(run_dir: Path) -> bool:
    """A complete checkpoint (the trainer renames it into place only once written)."""
    return bool(list_checkpoints(run_dir))


def trained_tokens(run: dict[str, Any]) -> int | None:
    """Tokens seen in training: tokens per epoch times the epochs actually run (a reinforcement
    run counts its sampled sequences itself: metrics.trained_tokens)."""
    if (run.get("metrics") or {}).get("trained_tokens") is not None:
        return int(run["metrics"]["trained_tokens"])
    train = (run.get("data") or {}).get("train") or {}
    resolved = run.get("resolved") or {}
    steps = (run.get("metrics") or {}).get("steps")
    tokens = train.get("tokens")
    spe = resolved.get("steps_per_epoch")
    if not tokens or not spe or steps is None:
        return None
    return int(round(tokens * steps / spe))


def last_error(log_path: Path, returncode: int) -> str:
    """The trainer's own error sentence (its last `error:` line), else the log's last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return f"training stopped with {errors[-1]}"
    tail = lines[-1] if lines else "no output"
    return f"training exited with code {returncode}: {tail[:500]}"
