"""The run directory's layout, named once: every module reads and writes a run through these names.

`tunesmith train --out RUN` leaves (and `eval`, `compare`, `report` add to it):

    RUN/
        run.json                         config, resolved plan, base model, data, final metrics
        metrics.jsonl                    one row per logged step (loss, lr, tokens/s, ...)
        samples.jsonl                    reinforcement: every sampled answer, its reward and grader errors
        tracking.json                    with --report-to: each tracker's run id, and any that failed
        tensorboard/, wandb/             with --report-to tensorboard, wandb: the trackers' own files
        checkpoints/
            step-000120/                 one per save, zero-padded; complete once renamed into place
                adapter_config.json      peft format (full fine-tuning: a whole HF model dir)
                adapter_model.safetensors
                tunesmith_adapter.json   {"base_model", "method", "step"}
                trainer_state.json       step, data position, best, RNG note
                optimizer.safetensors    AdamW moments per parameter name
                rng.safetensors          torch RNG state
            best.json                    {"step", "valid_loss"}
        adapter/                         the adapter to use (best checkpoint, else last), no training state
        eval/                            `tunesmith eval --adapter RUN`'s default output
            metrics.json                 headline scores, loss, latency, confusion matrix
            predictions.jsonl            one row per example
        compare/                         a comparison (as `flows/demo.py` writes it)
            compare.json                 plus one eval folder per strategy
        report.html                      `tunesmith report RUN`
        audit.json                       `tunesmith audit --report RUN` (a section of the report)

A checkpoint folder name is `step-` and the step, zero-padded to six digits when written;
the lister also accepts unpadded names (`step-12`).

    python -c "from tunesmith.runs import list_checkpoints; print(list_checkpoints('runs/first'))"
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# --- the run directory
RUN_FILE = "run.json"
TRAIN_METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
"""Reinforcement fine-tuning: one row per sampled answer (step, prompt line, text, reward, errors)."""
TRACKING_FILE = "tracking.json"
"""The trackers a run reports to (--report-to): {"runs": {tracker: run id}, "failed": {tracker: message}}."""
CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best.json"
"""In CHECKPOINTS_DIR: the step with the best validation loss."""
ADAPTER_DIR = "adapter"
EVAL_DIR = "eval"
COMPARE_DIR = "compare"
REPORT_FILE = "report.html"
AUDIT_FILE = "audit.json"
"""`tunesmith audit --report RUN`'s findings, shown by `tunesmith report RUN`."""

# --- a checkpoint's training state (left out of RUN/adapter)
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TRAINING_STATE_FILES = (STATE_FILE, OPTIMIZER_FILE, RNG_FILE)

# --- an adapter directory (RUN/adapter, a LoRA checkpoint): peft's files plus ours
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_META_FILE = "tunesmith_adapter.json"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_META_FILE)

# --- an evaluation folder (RUN/eval, each strategy's folder in a comparison) and a comparison
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_METRICS_FILE = "metrics.json"
COMPARE_FILE = "compare.json"

STEP_PREFIX = "step-"
_STEP_NAME = re.compile(r"step-(\d+)")


def checkpoint_dir(run: Path, step: int) -> Path:
    """RUN/checkpoints/step-000120: where the checkpoint of `step` is (or will be) written."""
    return Path(run) / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:06d}"


def parse_step(name: str) -> int | None:
    """The step a checkpoint name stands for ("step-000120" or "step-120" -> 120), else None."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run: Path, require: str | tuple[str, ...] = STATE_FILE) -> list[tuple[int, Path]]:
    """The run's checkpoints as (step, folder), by step; only folders holding every `require` file.

    The default, the trainer's state file, means a complete checkpoint: the trainer renames
    a checkpoint into place only once it is written. An adapter lookup asks for
    ADAPTER_CONFIG_FILE instead. Entries whose name is not a step (best.json, the trainer's
    temporary folders) are skipped."""
    root = Path(run) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    wanted = (require,) if isinstance(require, str) else require
    found = []
    for path in root.iterdir():
        step = parse_step(path.name)
        if step is not None and all((path / name).is_file() for name in wanted):
            found.append((step, path))
    return sorted(found)


def read_run_json(run: Path) -> dict[str, Any]:
    """RUN/run.json parsed; a missing or broken file raises (OSError, ValueError) for the caller to word."""
    return json.loads((Path(run) / RUN_FILE).read_text())
