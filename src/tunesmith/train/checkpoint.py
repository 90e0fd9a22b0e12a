"""Checkpoints: written atomically, loaded from safetensors and JSON only (never pickles).

The files of a checkpoint (`OUT/checkpoints/step-000120/`), `checkpoints/best.json` and
`OUT/adapter/` are named, and drawn, in `tunesmith.runs`.

A checkpoint is written into a temporary directory and renamed into place, so a kill in
the middle of a save leaves the previous checkpoints as they were.

    python -c "from tunesmith.train.checkpoint import latest_checkpoint; print(latest_checkpoint('runs/first'))"
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.fileio import write_atomically
from tunesmith.runs import (
    ADAPTER_DIR,
    ADAPTER_META_FILE,
    ADAPTER_WEIGHTS_FILE,
    BEST_FILE,
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    TRAINING_STATE_FILES,
    checkpoint_dir,
    list_checkpoints,
)
from tunesmith.train.model import full_tensor, like, trainable_parameters

KEEP_LAST = 2
"""Checkpoints kept besides the best one (older ones are deleted)."""
ADAPTER_METHODS = ("lora", "qlora", "dpo", "reinforcement")
"""Methods whose checkpoints hold a peft adapter (the others: a whole model)."""


class TrainingError(TunesmithError):
    """The run stopped: NaN loss, disk full, interrupted. The message says how to go on."""


class TrainingInterrupted(TrainingError):
    exit_code = 130


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (the one --resume continues from), or None."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (None for a new run); a resume without a checkpoint,
    or a new run into a folder that has some, is an error saying what to do."""
    found = latest_checkpoint(out)
    if resume and found is None:
        raise TrainingError(f"--resume {out}: the run has no checkpoint yet; start it again without --resume")
    if not resume and found is not None:
        raise TrainingError(f"run directory {out} already holds checkpoints; continue it with --resume {out} or pick another --out")
    return found if resume else None


DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1))


def disk_error(exc: Exception) -> bool:
    """No space left, a quota or a file-size limit; safetensors reports these as its own error."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_ERRNOS
    return any(f"os error {n})" in str(exc) for n in DISK_ERRNOS)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move tmp to final; an existing final is swapped out first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    optimizer: Any,
    names: list[str],
    state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer: Any = None,
    gathered: tuple[dict[str, Any], tuple[dict, dict]] | None = None,
    only_adapter: str | None = None,
) -> Path:
    """Write checkpoints/step-N atomically; on a full disk raise TrainingError naming the last good one.

    gathered: (model state dict, optimizer_tensors) already collected from a sharded (FSDP)
    model by every process; without it both are read from the model and optimizer here.
    only_adapter: the one peft adapter to save when the model holds others (reinforcement's
    frozen KL reference); peft's save_pretrained would write each other one into a subfolder."""
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(out, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        selected = {"selected_adapters": [only_adapter]} if only_adapter else {}
        if gathered is not None:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=gathered[0], **selected)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **selected)
        if tokenizer is not None:  # full fine-tuning: the directory is a complete HF model
            tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
        opt_tensors, steps = gathered[1] if gathered is not None else optimizer_tensors(optimizer, names)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer_steps": steps}, indent=2) + "\n")
        _replace_dir(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_error(exc):
            raise
        raise disk_full_error(out, f"checkpoint {final}") from None
    return final


def disk_full_error(out: Path, what: Any) -> TrainingError:
    """One sentence: what could not be written, the last good checkpoint, how to go on."""
    last = latest_checkpoint(out)
    return TrainingError(
        f"the disk is full (or a file-size limit was hit) while writing {what}; "
        + (f"the last good checkpoint {last} is intact: free space, then `tunesmith train --resume {out}`"
           if last else "no checkpoint was saved yet: free space and start again")
    )


def optimizer_tensors(optimizer: Any, names: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """AdamW state as named tensors (safetensors) plus each parameter's step count (JSON).
    With a sharded model every process must call it (the shards are gathered)."""

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    steps: dict[str, float] = {}
    for idx, name in enumerate(names):
        st = sd["state"].get(idx)
        if not st:
            continue
        for key, value in st.items():
            if key == "step":
                steps[name] = float(value)
            else:
                tensors[f"{key}/{name}"] = full_tensor(value.detach()).contiguous().clone()
    return tensors, steps


def load_optimizer(optimizer: Any, names: list[str], ckpt: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / OPTIMIZER_FILE))
    steps = json.loads((ckpt / STATE_FILE).read_text())["optimizer_steps"]
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, name in enumerate(names):
        if name not in steps:
            continue
        entry: dict[str, Any] = {"step": torch.tensor(steps[name], dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = like(tensors[f"{key}/{name}"], params[idx])
        state[idx] = entry
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def load_weights(model: Any, ckpt: Path, method: str) -> None:
    """Put a checkpoint's trained weights back into the model (safetensors only)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return _load_sharded_weights(model, ckpt, method)

    if method in ADAPTER_METHODS:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / ADAPTER_WEIGHTS_FILE)))
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        if bad:
            raise TrainingError(f"checkpoint {ckpt} does not fit this model (unexpected weights {bad[:3]}); check --model")
        return
    weights: dict[str, Any] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name not in (OPTIMIZER_FILE, RNG_FILE):
            weights.update(load_file(str(f)))
    missing, _ = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if really_missing:
        raise TrainingError(f"checkpoint {ckpt} is missing weights {really_missing[:3]}")


def _load_sharded_weights(model: Any, ckpt: Path, method: str) -> None:
    """FSDP: every process reads the whole file and keeps its shard of each trained weight."""
    import torch
    from safetensors.torch import load_file

    files = [ckpt / ADAPTER_WEIGHTS_FILE] if method in ADAPTER_METHODS else [
        f for f in sorted(ckpt.glob("*.safetensors")) if f.name not in (OPTIMIZER_FILE, RNG_FILE)]
    saved: dict[str, Any] = {}
    for f in files:
        saved.update(load_file(str(f)))
    missing = []
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            key = name.replace(".default.", ".") if method in ADAPTER_METHODS else name  # peft drops the adapter name
            if key in saved:
                p.copy_(like(saved[key], p))
            elif "lm_head" not in key:
                missing.append(key)
    if missing:
        raise TrainingError(f"checkpoint {ckpt} is missing weights {missing[:3]}; check --model")


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def mark_best(out: Path, step: int, valid_loss: float) -> None:
    write_atomically(Path(out) / CHECKPOINTS_DIR / BEST_FILE,
                     json.dumps({"step": step, "valid_loss": valid_loss}) + "\n")


def best_step(out: Path) -> int | None:
    path = Path(out) / CHECKPOINTS_DIR / BEST_FILE
    return json.loads(path.read_text())["step"] if path.is_file() else None


def prune_checkpoints(out: Path) -> None:
    """Keep the best checkpoint and the KEEP_LAST most recent ones."""
    keep_best = best_step(out)
    for step, path in list_checkpoints(out)[:-KEEP_LAST]:
        if step != keep_best:
            shutil.rmtree(path, ignore_errors=True)


def publish_adapter(out: Path, ckpt: Path) -> Path:
    """Copy a checkpoint's model files (not its training state) to OUT/adapter atomically."""
    final = Path(out) / ADAPTER_DIR
    tmp = Path(out) / f".tmp-{ADAPTER_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns(*TRAINING_STATE_FILES))
        _replace_dir(tmp, final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_error(exc):
            raise
        raise TrainingError(f"the disk is full while writing {final}; the checkpoint {ckpt} is intact and usable as the adapter") from None
    return final
