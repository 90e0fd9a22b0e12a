"""A run directory cut down to what resuming it needs: the run's files, the newest and the best
checkpoint (adapter/ once final). The Ray executor reports one to Ray's storage at each
checkpoint; a jobs worker with `--storage` publishes one there, so that a worker on another
machine can resume the job.

    python -c "from tunesmith.jobs.run_snapshot import snapshot_run; snapshot_run(RUN, DEST, final=False)"
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunesmith.runs import (
    ADAPTER_DIR,
    BEST_FILE,
    CHECKPOINTS_DIR,
    RUN_FILE,
    TRACKING_FILE,
    TRAIN_METRICS_FILE,
    checkpoint_dir,
    list_checkpoints,
)
from tunesmith.train.preference import REFERENCE_FILE

RAY_FILE = "ray.json"
"""In the local run directory: the Ray run's storage path and name, so --resume finds its checkpoints."""


def snapshot_run(out: Path, dest: Path, final: bool) -> Path:
    """Copy what resuming `out` needs into `dest` (new): run.json, metrics.jsonl (whole lines
    only: the trainer may be appending), the trackers' and the Ray run's files, DPO's reference
    log-probs, the newest and the best checkpoint, and adapter/ when `final`. Hard links where
    the disk allows."""
    dest.mkdir(parents=True)
    for name in (RUN_FILE, TRACKING_FILE, REFERENCE_FILE, RAY_FILE):
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    if (out / TRAIN_METRICS_FILE).is_file():
        rows = (out / TRAIN_METRICS_FILE).read_bytes()
        (dest / TRAIN_METRICS_FILE).write_bytes(rows[:rows.rfind(b"\n") + 1])
    kept = list_checkpoints(out)
    wanted = {kept[-1][0]} if kept else set()
    best = out / CHECKPOINTS_DIR / BEST_FILE
    if best.is_file():
        wanted.add(json.loads(best.read_text())["step"])
        (dest / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        shutil.copy2(best, dest / CHECKPOINTS_DIR / BEST_FILE)
    for step in wanted:
        shutil.copytree(checkpoint_dir(out, step), checkpoint_dir(dest, step), copy_function=link_or_copy)
    if final and (out / ADAPTER_DIR).is_dir():
        shutil.copytree(out / ADAPTER_DIR, dest / ADAPTER_DIR, copy_function=link_or_copy)
    return dest


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
