"""What `tunesmith train` does with its options: resolve the config (YAML file, then flags),
print a dry run, or launch --nproc processes, then train. The options themselves are
generated from TrainConfig in cli/train.py.

    tunesmith train -c run.yaml --dry-run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunesmith.data.stats import auto_epochs
from tunesmith.models.registry import identity, load_tokenizer, resolve_model
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig, resolve_config
from tunesmith.train.inputs import load_training_items
from tunesmith.train.model import check_qlora, precision_dtype, resolve_init_adapter, with_adapter_shape
from tunesmith.train.run import train


def run_train_command(options: dict[str, Any]) -> None:
    config_file = options.pop("config", None)
    dry_run = options.pop("dry_run", False)
    nproc = options.pop("nproc", 1)
    overrides = {k: v for k, v in options.items() if v is not None}
    if isinstance(overrides.get("epochs"), str) and overrides["epochs"].isdigit():
        overrides["epochs"] = int(overrides["epochs"])
    cfg = resolve_config(config_file, overrides)
    if cfg.method == "qlora" and nproc > 1 and not dry_run:  # once here, not once per launched process
        check_qlora(cfg, resolve_model(cfg.model), nproc)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_launch(nproc))
    if dry_run:
        dry_run_report(cfg)
        return
    import warnings

    from transformers.utils import logging as hf_logging

    # The command's own progress is the report; library progress bars and deprecation
    # notices would bury it (this is the CLI process, so quieting them here is contained).
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    train(cfg)


def _launch(nproc: int) -> int:
    """Re-run this same command under torch.distributed.run with nproc processes."""
    args = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunesmith.cli", *args]
    import signal

    # SIGTERM (the jobs worker, `kill`) reaches only this process: pass it on to torchrun,
    # which passes it to every rank, so they checkpoint together. Ctrl-C reaches the whole
    # process group already; dying on it here (subprocess.call's reaction) would SIGKILL
    # torchrun and lose the checkpoint, so this process just waits for the ranks.
    # torchrun answers a stop with its own traceback after the ranks' one-line message, so
    # the ranks' stderr passes through here and that line is repeated last.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopped = ""
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("error: stopped by"):
            stopped = line
    code = proc.wait()
    if stopped:
        sys.stderr.write(stopped)
        return 130
    return code


def dry_run_report(cfg: TrainConfig) -> None:
    """Resolved config, data statistics and a compute estimate; loads no model weights."""

    ref = resolve_model(cfg.model)
    dpo = cfg.method == "dpo"
    if cfg.init_adapter:
        cfg = with_adapter_shape(cfg, resolve_init_adapter(cfg.init_adapter, identity(ref)))
    tokenizer = load_tokenizer(ref)
    train_ex, stats = load_training_items(tokenizer, cfg.data, cfg)
    if cfg.validation:
        valid = load_training_items(tokenizer, cfg.validation, cfg)[0]
    else:
        train_ex, valid = td.split_validation(train_ex, cfg.val_split, cfg.seed)
    epochs = auto_epochs(len(train_ex)) if cfg.epochs == "auto" else cfg.epochs
    spe = td.steps_per_epoch(len(train_ex), cfg.batch_size)
    total = cfg.max_steps or epochs * spe
    tokens = sum(len(t) for t in train_ex)
    tokens_total = tokens / max(1, len(train_ex)) * min(cfg.batch_size, len(train_ex)) * total
    n_params = _parameter_count(ref)
    flops = (6 if cfg.method == "full" else 4) * n_params * tokens_total
    estimate = {"tokens": int(tokens_total), "base_parameters": n_params}
    if dpo:  # one forward pass (2 x parameters FLOPs per token) over every pair before the first step
        estimate["reference_pass_tokens"] = tokens + sum(len(t) for t in valid)
        flops += 2 * n_params * estimate["reference_pass_tokens"]
    unit = "pairs" if dpo else "examples"
    report = {
        "config": json.loads(cfg.model_dump_json()),
        "resolved": {"epochs": epochs, "steps_per_epoch": spe, "total_steps": total, "learning_rate": cfg.lr,
                     "precision": str(precision_dtype(cfg.precision)).replace("torch.", "")},
        "data": {f"train_{unit}": len(train_ex), f"validation_{unit}": len(valid),
                 **{k: v for k, v in stats.to_dict().items() if k != "examples"}},
        "estimate": {**estimate, "training_flops": float(f"{flops:.3g}"),
                     "note": "about 4 x parameters FLOPs per token for LoRA and DPO (6 x for full; DPO adds one "
                             "forward pass over the data for the reference); divide by your measured FLOP/s"},
    }
    print(json.dumps(report, indent=2, default=str))


def _parameter_count(ref: Any) -> int:
    """Parameters of the base model, read from its safetensors headers (no weights loaded)."""
    import struct

    total = 0
    files = sorted(Path(ref.path).glob("*.safetensors")) if not ref.is_gguf else []
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count
    return total
