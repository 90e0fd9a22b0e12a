"""Measure how fast this machine trains a model, so estimates are measured, not guessed.

A few steps of tunesmith's own LoRA training step (the model `tunesmith train` builds:
r=16 on all linear layers, frozen weights in the compute dtype, packed examples, the LM
head at trained positions only; AdamW) on random tokens shaped like the user's examples,
without compiling. The result is cached in `$TUNESMITH_HOME/speed.json` keyed by model
hash, torch version, CPU and shape, so only the first `tunesmith validate` for a model and
shape on a machine pays for it.

    python -c "from tunesmith.models.registry import resolve_model; \
from tunesmith.models.speed import measure_train_tokens_per_s as m; print(m(resolve_model()))"
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable

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


def measure_train_tokens_per_s(
    model_ref: ModelRef,
    seq_len: int = 256,
    batch_size: int = 1,
    steps: int = 2,
    home: Path | None = None,
    use_cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> float:
    """Tokens per second of LoRA training (forward + backward + optimizer step), each step
    `batch_size` examples of `seq_len` tokens packed together, as `tunesmith train` runs them.

    Cached per model hash, torch version, CPU (name and count) and shape; `use_cache=False`
    measures again and overwrites the entry. A value measured while the machine was busy
    is measured again on the first call that finds the machine idle.
    """
    cache_file = (home or Settings.from_env().home) / SPEED_FILE
    key = speed_key(model_ref, seq_len, batch_size)
    cache = _read_cache(cache_file)
    entry = cache.get(key)
    if use_cache and entry and not (entry.get("busy") and not machine_busy()):
        return float(entry["tokens_per_s"])
    busy = machine_busy()
    if log:
        log(f"measuring LoRA training speed of {model_ref.name} on this machine (once; cached in {cache_file})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not ours
        tokens_per_s, precision, device = _measure(model_ref, seq_len, batch_size, steps)
    cache[key] = {
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
    return tokens_per_s


def load_speed_entry(model_ref: ModelRef, seq_len: int = 256, batch_size: int = 1, home: Path | None = None) -> dict[str, Any] | None:
    """The cached measurement (tokens_per_s, precision, busy, measured_at, ...), if any."""
    cache = _read_cache((home or Settings.from_env().home) / SPEED_FILE)
    return cache.get(speed_key(model_ref, seq_len, batch_size))


def _measure(model_ref: ModelRef, seq_len: int, batch_size: int, steps: int) -> tuple[float, str, str]:
    import torch

    from tunesmith.data.render import IGNORE_INDEX, TokenizedExample
    from tunesmith.errors import UsageError
    from tunesmith.train import data as td
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.model import build_model, forward_loss, precision_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = precision_dtype("auto")
    cfg = TrainConfig(data=Path("speed-probe"), model=model_ref.name, lora_rank=LORA_RANK, max_seq_len=seq_len)
    try:
        model = build_model(model_ref, cfg, compute_dtype)
    except UsageError:  # a model type training can't pack runs padded rows, and so is timed
        cfg = cfg.model_copy(update={"packing": False})
        model = build_model(model_ref, cfg, compute_dtype)
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).tolist()
    trained_from = seq_len - max(1, seq_len // TRAINED_SHARE)
    examples = [TokenizedExample(row, [IGNORE_INDEX] * trained_from + row[trained_from:]) for row in ids]
    batch = td.to_device(td.collate(examples, cfg.packing, 0), device)

    def step() -> None:
        loss, n, _ = forward_loss(model, batch, compute_dtype)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels and autocast caches
    # The fastest step, as timeit does: other processes only ever slow a step down.
    fastest = float("inf")
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        fastest = min(fastest, time.perf_counter() - t0)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return batch_size * seq_len / fastest, "bf16" if compute_dtype == torch.bfloat16 else "fp32", name


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
