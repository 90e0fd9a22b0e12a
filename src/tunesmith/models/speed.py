"""The cache of measured training speeds, `$TUNESMITH_HOME/speed.json`.

`tunesmith.train.speed` measures (it runs training steps); everything else, the file
validation behind `tunesmith validate` and the server's validation route included, only
reads what was measured here, keyed by model hash, torch version, CPU and shape.

    python -c "from tunesmith.models.registry import resolve_model; \
from tunesmith.models.speed import load_speed_entry as s; print(s(resolve_model()))"
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from tunesmith.fileio import write_atomically
from tunesmith.models.registry import ModelRef, identity
from tunesmith.settings import Settings

SPEED_FILE = "speed.json"
LORA_RANK = 16
TRAINED_SHARE = 4
"""The last 1/TRAINED_SHARE of every probe example carries a loss (the LM head runs there)."""
STEP_KIND = "tunesmith step v2"
"""In the cache key: v1 entries timed a plain peft step (LM head everywhere, bf16 autocast over
fp32 weights), about half the speed of the trainer's, and must not answer for it."""


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_busy() -> bool:
    """Whether more runnable processes than CPUs compete right now (1-minute load average)."""
    if not hasattr(os, "getloadavg"):
        return False
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def speed_key(model_ref: ModelRef, seq_len: int, batch_size: int) -> str:
    """Cache key: what makes a measurement valid elsewhere. Computed without importing
    torch (a second saved on every validate); the device is a property of the machine,
    which the CPU name and count stand for."""
    from importlib.metadata import version

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model_hash = identity(model_ref)["sha256"][:16]
    return (f"{model_hash}|torch {version('torch')}|{cpu_name()} x{cpus}|{STEP_KIND}|lora r{LORA_RANK}"
            f"|{batch_size}x{seq_len}")


def record_speed(model_ref: ModelRef, seq_len: int, batch_size: int, steps: int, tokens_per_s: float,
                 precision: str, device: str, busy: bool, home: Path | None = None) -> None:
    """Store one measurement under its key (train.speed measures; everyone else only reads)."""
    cache_file = speed_file(home)
    cache = _read_cache(cache_file)
    cache[speed_key(model_ref, seq_len, batch_size)] = {
        "tokens_per_s": tokens_per_s,
        "precision": precision,
        "device": device,
        # Measured while other processes held the CPUs: kept while the machine stays busy
        # (it is what training would get now), measured again once it is idle.
        "busy": busy or machine_busy(),
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_cache(cache_file, cache)


def speed_file(home: Path | None = None) -> Path:
    return (home or Settings.from_env().home) / SPEED_FILE


def load_speed_entry(model_ref: ModelRef, seq_len: int = 256, batch_size: int = 1, home: Path | None = None) -> dict[str, Any] | None:
    """The cached measurement (tokens_per_s, precision, busy, measured_at, ...), if any."""
    cache = _read_cache(speed_file(home))
    return cache.get(speed_key(model_ref, seq_len, batch_size))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    # Atomic: a concurrent validate never reads half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(cache, indent=2, sort_keys=True))
