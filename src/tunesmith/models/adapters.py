"""Find a trained adapter on disk and check it belongs to the base model it is put on.

A run directory (`tunesmith train --out runs/NAME`) holds `adapter/` (the adapter to use:
the best checkpoint by validation loss, else the last) and `checkpoints/step-N/`. Each
adapter directory is in peft's format (`adapter_config.json`, `adapter_model.safetensors`,
loadable by `PeftModel.from_pretrained` and vLLM) plus `tunesmith_adapter.json`, which
records the base model's name and content hash.

    python -c "from tunesmith.models.adapters import resolve_adapter; print(resolve_adapter('runs/first'))"
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunesmith.errors import AdapterError, UsageError
from tunesmith.runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_META_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINTS_DIR,
    STEP_PREFIX,
    list_checkpoints,
    parse_step,
)


def resolve_adapter(path: str | Path, checkpoint: str = "best") -> Path:
    """The adapter directory for a run directory or an adapter directory.

    checkpoint: "best" (the run's chosen adapter), "last", or "step-N".
    """
    path = Path(path).expanduser()
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return path
    if not path.exists():
        raise UsageError(f"adapter '{path}' does not exist; give a run directory or an adapter directory")
    if checkpoint == "best" and (path / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    # Checkpoints count here once their adapter is written, training state or not.
    found = list_checkpoints(path, require=ADAPTER_CONFIG_FILE)
    if checkpoint in ("best", "last") and found:
        return found[-1][1]
    if checkpoint.startswith(STEP_PREFIX):
        step = parse_step(checkpoint)
        for have_step, ckpt in found:
            if have_step == step:
                return ckpt
        have = [p.name for _, p in found]
        raise UsageError(f"run '{path}' has no checkpoint {checkpoint}; it has: {', '.join(have) or 'none'}")
    full = full_weights_dir(path)
    if full is not None:  # e.g. a `method: full` trial of a sweep, given to `serve --adapter` or published
        raise UsageError(
            f"'{path}' holds whole fine-tuned weights (method full), not an adapter; serve them as the "
            f"base model: tunesmith serve --model {full}"
        )
    raise UsageError(
        f"'{path}' holds no adapter (no {ADAPTER_CONFIG_FILE} in it, in {ADAPTER_DIR}/ or in {CHECKPOINTS_DIR}/); "
        "was the training run finished or checkpointed?"
    )


def full_weights_dir(path: str | Path) -> Path | None:
    """The model folder a full fine-tuning run saved (`--method full`: whole weights where a
    LoRA run has its adapter), for a run directory or that folder itself; None otherwise."""
    path = Path(path).expanduser()
    for folder in (path, path / ADAPTER_DIR):
        if (folder / "config.json").is_file() and adapter_meta(folder).get("method") == "full":
            return folder
    return None


def adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    meta = adapter_dir / ADAPTER_META_FILE
    return _json_object(meta) if meta.is_file() else {}


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or a UsageError saying what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"'{path}' is not valid JSON ({str(exc)[:120]}); re-save the adapter") from None
    if not isinstance(value, dict):
        raise AdapterError(f"'{path}' must hold a JSON object, not {type(value).__name__}; re-save the adapter")
    return value


def check_shapes(adapter_dir: Path, base_config: Any) -> None:
    """Refuse, before peft allocates anything, an adapter whose shapes cannot belong to this
    base: a rank wider than the model, or a tensor bigger than the base's largest weight
    (its adapter_config.json and safetensors header are read, never the weights)."""
    width = max(int(getattr(base_config, k, 0) or 0) for k in ("hidden_size", "intermediate_size"))
    largest = width * max(width, int(getattr(base_config, "vocab_size", 0) or 0))
    config = _json_object(adapter_dir / ADAPTER_CONFIG_FILE)
    ranks = [config.get("r", 8), *dict(config.get("rank_pattern") or {}).values()]
    for r in ranks:
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= width:
            raise AdapterError(f"adapter '{adapter_dir}': rank {r!r} in {ADAPTER_CONFIG_FILE} does not fit a base "
                             f"{width} wide; it was not trained on this base")
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    try:
        with open(weights, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(fh.read(size))
        shapes = [t["shape"] for name, t in header.items() if name != "__metadata__"]
        numels = [math.prod(int(d) for d in shape) for shape in shapes]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AdapterError(f"adapter '{adapter_dir}': {ADAPTER_WEIGHTS_FILE} is not a readable safetensors file "
                         f"({str(exc)[:120]})") from None
    if any(n > largest for n in numels):
        raise AdapterError(f"adapter '{adapter_dir}' holds a tensor of {max(numels):,} values, more than this base's "
                         f"largest weight ({largest:,}); it was not trained on this base")


def check_base(adapter_dir: Path, base_identity: dict[str, Any]) -> None:
    """Refuse an adapter trained on a different base model (by content hash)."""
    want = adapter_meta(adapter_dir).get("base_model", {})
    if want.get("sha256") and base_identity.get("sha256") and want["sha256"] != base_identity["sha256"]:
        name = want.get("name")
        raise AdapterError(
            f"adapter '{adapter_dir}' was trained on base model '{name or 'unnamed'}' "
            f"(sha256 {want['sha256'][:12]}), not on '{base_identity.get('name')}' "
            f"(sha256 {base_identity['sha256'][:12]}); "
            + (f"pass --model {name}" if name else "pass the --model it was trained on")
        )
