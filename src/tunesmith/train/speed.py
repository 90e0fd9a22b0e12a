"""Measure how fast this machine trains a model, so estimates are measured, not guessed.

A few steps of tunesmith's own LoRA training step (the model `tunesmith train` builds:
r=16 on all linear layers, frozen weights in the compute dtype, packed examples, the LM
head at trained positions only; AdamW) on random tokens shaped like the user's examples,
without compiling. The result goes to the cache in `tunesmith.models.speed`, so only the
first `tunesmith validate` for a model and shape on a machine pays for it; the server
never measures (it reads the cache).

    python -c "from tunesmith.models.registry import resolve_model; \
from tunesmith.train.speed import measure_train_tokens_per_s as m; print(m(resolve_model()))"
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

from tunesmith.data.render import IGNORE_INDEX, TokenizedExample
from tunesmith.errors import UsageError
from tunesmith.models.registry import ModelRef
from tunesmith.models.speed import LORA_RANK, TRAINED_SHARE, load_speed_entry, machine_busy, record_speed, speed_file
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig
from tunesmith.train.model import build_model, forward_loss, precision_dtype


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
    cache_file = speed_file(home)
    entry = load_speed_entry(model_ref, seq_len, batch_size, home)
    if use_cache and entry and not (entry.get("busy") and not machine_busy()):
        return float(entry["tokens_per_s"])
    busy = machine_busy()
    if log:
        log(f"measuring LoRA training speed of {model_ref.name} on this machine (once; cached in {cache_file})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not ours
        tokens_per_s, precision, device = _measure(model_ref, seq_len, batch_size, steps)
    record_speed(model_ref, seq_len, batch_size, steps, tokens_per_s, precision, device, busy, home)
    return tokens_per_s


def _measure(model_ref: ModelRef, seq_len: int, batch_size: int, steps: int) -> tuple[float, str, str]:
    import torch

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


def measure_step_s(model_ref: ModelRef, examples: list[TokenizedExample], steps: int = 3) -> float:
    """Seconds per optimizer step on exactly these examples (one batch), as `tunesmith train`
    runs it: packed, the batch's shared prefix computed once, the compute dtype --precision
    auto picks, eager. The median of `steps` steps after a warm-up one, so a single step
    slowed by another process does not decide. Not cached: the demo measures its own rows."""
    import statistics

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = precision_dtype("auto")
    cfg = TrainConfig(data=Path("speed-probe"), model=model_ref.name, lora_rank=LORA_RANK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = build_model(model_ref, cfg, compute_dtype).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = td.to_device(td.collate(examples, cfg.packing, 0, share_prefix=True), device)
    times = []
    for _ in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, n, _ = forward_loss(model, batch, compute_dtype)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
