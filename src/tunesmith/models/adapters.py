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
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError

ADAPTER_META = "tunesmith_adapter.json"


def resolve_adapter(path: str | Path, checkpoint: str = "best") -> Path:
    """The adapter directory for a run directory or an adapter directory.

    checkpoint: "best" (the run's chosen adapter), "last", or "step-N".
    """
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file():
        return path
    if not path.exists():
        raise UsageError(f"adapter '{path}' does not exist; give a run directory or an adapter directory")
    ckpts = path / "checkpoints"
    if checkpoint == "best" and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    if checkpoint in ("best", "last") and ckpts.is_dir():
        steps = sorted(
            (p for p in ckpts.iterdir() if p.name.startswith("step-") and (p / "adapter_config.json").is_file()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        if steps:
            return steps[-1]
    if checkpoint.startswith("step-"):
        cand = ckpts / f"step-{int(checkpoint.split('-')[1]):06d}"
        if (cand / "adapter_config.json").is_file():
            return cand
        have = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
        raise UsageError(f"run '{path}' has no checkpoint {checkpoint}; it has: {', '.join(have) or 'none'}")
    raise UsageError(
        f"'{path}' holds no adapter (no adapter_config.json in it, in adapter/ or in checkpoints/); "
        "was the training run finished or checkpointed?"
    )


def adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    meta = adapter_dir / ADAPTER_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def check_base(adapter_dir: Path, base_identity: dict[str, Any]) -> None:
    """Refuse an adapter trained on a different base model (by content hash)."""
    want = adapter_meta(adapter_dir).get("base_model", {})
    if want.get("sha256") and base_identity.get("sha256") and want["sha256"] != base_identity["sha256"]:
        raise UsageError(
            f"adapter '{adapter_dir}' was trained on base model '{want.get('name')}' "
            f"(sha256 {want['sha256'][:12]}), not on '{base_identity.get('name')}' "
            f"(sha256 {base_identity['sha256'][:12]}); pass --model {want.get('name')}"
        )
