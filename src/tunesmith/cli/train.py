"""`tunesmith train`: one option per TrainConfig field, generated from its types and
descriptions (grouped in panels), plus -c, --dry-run, --nproc with the multi-node flags
(--nnodes, --node-rank, --rdzv-endpoint) and the Ray executor's (--ray-*). What the command does
with them lives in train/command.py, which the jobs worker reaches through this command.

    tunesmith train --help
    tunesmith train -c run.yaml --dry-run
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape  # help texts hold brackets (pip install 'tunesmith[gpu]') that rich would eat

# Imported when the CLI loads, not in the command body: typer reads the options from the
# signature, which is built from TrainConfig's fields (pydantic, no torch).
from tunesmith.train.config import TrainConfig, field_groups

PANELS = {"data": "Data", "model": "Model", "method": "Method", "optimisation": "Optimisation",
          "evaluation": "Evaluation", "output": "Output", "tracking": "Tracking"}


def _option_type(name: str, annotation: Any) -> Any:
    if name == "packing":
        return Optional[bool]
    text = str(annotation)
    if name in ("epochs", "lora_target_modules", "method", "precision", "report_to", "tracking_tags"):
        return Optional[str]
    for typ in (Path, float, int, str):
        if annotation is typ or typ.__name__ in text and "Literal" not in text:
            return Optional[typ]
    return Optional[str]


def train_signature() -> inspect.Signature:
    """Typer parameters: -c, one option per TrainConfig field (grouped panels), --dry-run, --nproc."""
    P = inspect.Parameter
    params = [P("config", P.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", "-c", help="YAML file with these options (flags given here override it).", rich_help_panel="Run"))]
    for group, names in field_groups().items():
        for name in names:
            info = TrainConfig.model_fields[name]
            flag = "--" + name.replace("_", "-")
            decls = ["--packing/--no-packing"] if name == "packing" else [flag]
            default = "required" if info.is_required() else info.default
            shown = default if not isinstance(default, (list, Path)) else str(default)
            params.append(P(name, P.KEYWORD_ONLY, annotation=_option_type(name, info.annotation), default=typer.Option(
                None, *decls, help=escape(f"{info.description} (default: {shown})"), show_default=False,
                rich_help_panel=PANELS[group])))
    params.append(P("dry_run", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--dry-run", help="Print the resolved config, data statistics and an estimate, then exit.", rich_help_panel="Run")))
    params.append(P("nproc", P.KEYWORD_ONLY, annotation=int, default=typer.Option(
        1, "--nproc", help="Processes to train with (data parallel through torch.distributed; same as torchrun).",
        rich_help_panel="Run")))
    # Multi-node: passed through to torch's elastic launcher (static rendezvous: node 0 of
    # --nnodes listens at --rdzv-endpoint). docs/scale-out.md has a Slurm example.
    params.append(P("nnodes", P.KEYWORD_ONLY, annotation=int, default=typer.Option(
        1, "--nnodes", help="Machines taking part (each runs this same command with its own --node-rank).",
        rich_help_panel="Run")))
    params.append(P("node_rank", P.KEYWORD_ONLY, annotation=int, default=typer.Option(
        0, "--node-rank", help="This machine's place among --nnodes, 0 to nnodes-1.", rich_help_panel="Run")))
    params.append(P("rdzv_endpoint", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT of node 0, where the machines meet (needed with --nnodes > 1).",
        rich_help_panel="Run")))
    # Ray: the same training function in each of --ray-workers Ray Train workers (pip install 'tunesmith[ray]').
    params.append(P("ray_address", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--ray-address", help=escape("Train on this Ray cluster (HOST:6379, ray://HOST:10001 or auto) instead "
        "of local processes; needs pip install 'tunesmith[ray]'."), rich_help_panel="Ray")))
    params.append(P("ray_workers", P.KEYWORD_ONLY, annotation=int, default=typer.Option(
        1, "--ray-workers", help="Ray Train workers (one process each, data parallel).", rich_help_panel="Ray")))
    params.append(P("ray_gpus_per_worker", P.KEYWORD_ONLY, annotation=float, default=typer.Option(
        0.0, "--ray-gpus-per-worker", help="GPUs each Ray worker holds (0: CPU with gloo).", rich_help_panel="Ray")))
    params.append(P("ray_storage", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--ray-storage", help="Where Ray keeps the run's checkpoints: a folder every node shares or an object "
        "store URI (s3://bucket/prefix); default OUT's parent/ray.", rich_help_panel="Ray")))
    return inspect.Signature(params)


def train_cmd(**options) -> None:
    """Fine-tune a model (LoRA by default) on a data file.

    tunesmith train --data train.jsonl --out runs/first; options come from -c run.yaml too (flags win).
    """
    from tunesmith.reinforce.run import train_rft
    from tunesmith.train.command import run_train_command

    trainers = {"reinforcement": train_rft}
    ray = {k: options.pop(k) for k in ("ray_address", "ray_workers", "ray_gpus_per_worker", "ray_storage")}
    if ray["ray_address"] is None:
        run_train_command(options, trainers=trainers)
        return
    from tunesmith.jobs.ray_executor import RayPlacement, train_on_ray

    placement = RayPlacement(address=ray["ray_address"], n_workers=ray["ray_workers"],
                             gpus_per_worker=ray["ray_gpus_per_worker"], storage=ray["ray_storage"])
    run_train_command(options, runner=lambda cfg: train_on_ray(cfg, placement), trainers=trainers)


train_cmd.__signature__ = train_signature()  # typer reads the options from the signature
