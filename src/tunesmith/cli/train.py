"""`tunesmith train`: one option per TrainConfig field, generated from its types and
descriptions (grouped in panels), plus -c, --dry-run and --nproc. What the command does
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
    return inspect.Signature(params)


def train_cmd(**options) -> None:
    """Fine-tune a model (LoRA by default) on a data file.

    tunesmith train --data train.jsonl --out runs/first; options come from -c run.yaml too (flags win).
    """
    from tunesmith.train.command import run_train_command

    run_train_command(options)


train_cmd.__signature__ = train_signature()  # typer reads the options from the signature
