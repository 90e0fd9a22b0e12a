"""What `tunesmith train` does with its options: resolve the config (YAML file, then flags),
print a dry run, or launch --nproc processes (on --nnodes machines), then train. The options themselves are
generated from TrainConfig in cli/train.py.

    tunesmith train -c run.yaml --dry-run
    tunesmith train -c run.yaml --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.stats import auto_epochs
from tunesmith.errors import ConfigError, UsageError
from tunesmith.models.registry import identity, load_tokenizer, resolve_model
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig, resolve_config
from tunesmith.train.inputs import load_training_items
from tunesmith.train.model import check_qlora, precision_dtype, resolve_init_adapter, with_adapter_shape
from tunesmith.train.run import train


def run_train_command(options: dict[str, Any], runner: Callable[[TrainConfig], Any] = train,
                      trainers: dict[str, Callable[[TrainConfig], Any]] | None = None) -> None:
    """`runner` trains the resolved config: `train` here, or the Ray executor (cli/train.py).
    `trainers`: the training function of a method that lives above train/ (reinforcement: the
    CLI passes reinforce.run.train_rft), by method; it trains that method in this process."""
    config_file = options.pop("config", None)
    dry_run = options.pop("dry_run", False)
    nproc = options.pop("nproc", 1)
    nodes = Nodes(options.pop("nnodes", 1), options.pop("node_rank", 0), options.pop("rdzv_endpoint", None))
    nodes.check()
    overrides = {k: v for k, v in options.items() if v is not None}
    if isinstance(overrides.get("epochs"), str) and overrides["epochs"].isdigit():
        overrides["epochs"] = int(overrides["epochs"])
    cfg = resolve_config(config_file, overrides)
    if cfg.method == "reinforcement" and (nproc > 1 or nodes.nnodes > 1 or runner is not train):
        raise UsageError("--method reinforcement trains in one process; drop --nproc, --nnodes and --ray-address")
    trainer = (trainers or {}).get(cfg.method, runner)
    if cfg.method == "qlora" and nproc > 1 and not dry_run:  # once here, not once per launched process
        check_qlora(cfg, resolve_model(cfg.model), nproc)
    if (nproc > 1 or nodes.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        if runner is not train:
            raise ConfigError("--nproc/--nnodes and --ray-address both place the processes: give one of them "
                              "(with Ray, --ray-workers sets how many)")
        sys.exit(_launch(nproc, nodes))
    if dry_run:
        dry_run_report(cfg)
        return
    import warnings

    from transformers.utils import logging as hf_logging

    # The command's own progress is the report; library progress bars and deprecation
    # notices would bury it (this is the CLI process, so quieting them here is contained).
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    trainer(cfg)


@dataclass(frozen=True)
class Nodes:
    """Where this machine stands in a multi-node run: torchrun's --nnodes, --node-rank,
    --rdzv-endpoint (static rendezvous: node 0 listens at the endpoint)."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    def check(self) -> None:
        problems = []
        if self.nnodes < 1:
            problems.append(f"--nnodes {self.nnodes}: give 1 or more machines")
        elif not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node-rank {self.node_rank}: with --nnodes {self.nnodes} it is 0 to {self.nnodes - 1}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"--rdzv-endpoint {self.rdzv_endpoint!r}: give HOST:PORT of node 0 "
                                "(e.g. --rdzv-endpoint node0.cluster:29500)")
        if problems:
            raise ConfigError("; ".join(problems))


_LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def _launch(nproc: int, nodes: Nodes = Nodes()) -> int:
    """Re-run this same command under torch.distributed.run with nproc processes (on each
    of nodes.nnodes machines)."""
    args = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in _LAUNCH_FLAGS:
            skip = True
            continue
        if a.startswith(tuple(f + "=" for f in _LAUNCH_FLAGS)):
            continue
        args.append(a)
    if nodes.nnodes > 1:
        where = [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}", f"--rdzv-endpoint={nodes.rdzv_endpoint}"]
    else:
        where = ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
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
    rft = cfg.method == "reinforcement"
    if cfg.init_adapter:
        cfg = with_adapter_shape(cfg, resolve_init_adapter(cfg.init_adapter, identity(ref)))
    tokenizer = load_tokenizer(ref)
    train_ex, stats = load_training_items(tokenizer, cfg.data, cfg)
    if cfg.validation:
        valid = load_training_items(tokenizer, cfg.validation, cfg)[0]
    else:
        train_ex, valid = td.split_validation(train_ex, cfg.val_split, cfg.seed)
    epochs = (1 if rft else auto_epochs(len(train_ex))) if cfg.epochs == "auto" else cfg.epochs
    spe = td.steps_per_epoch(len(train_ex), cfg.batch_size)
    total = cfg.max_steps or epochs * spe
    tokens = sum(len(t) for t in train_ex)
    if rft:  # each prompt with --group-size answers of at most --max-completion-tokens
        tokens = sum(cfg.group_size * (len(t) + cfg.max_completion_tokens) for t in train_ex)
    tokens_total = tokens / max(1, len(train_ex)) * min(cfg.batch_size, len(train_ex)) * total
    n_params = _parameter_count(ref)
    flops = (6 if cfg.method == "full" else 4) * n_params * tokens_total
    estimate = {"tokens": int(tokens_total), "base_parameters": n_params}
    if dpo:  # one forward pass (2 x parameters FLOPs per token) over every pair before the first step
        estimate["reference_pass_tokens"] = tokens + sum(len(t) for t in valid)
        flops += 2 * n_params * estimate["reference_pass_tokens"]
    if rft:  # sampling decodes every answer token once more, a forward pass each
        estimate["sampled_tokens_at_most"] = int(min(cfg.batch_size, len(train_ex)) * cfg.group_size
                                                 * cfg.max_completion_tokens * total)
        flops += 2 * n_params * estimate["sampled_tokens_at_most"]
    unit = "pairs" if dpo else "prompts" if rft else "examples"
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
