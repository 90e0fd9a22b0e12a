"""`tunesmith export`: a run as merged Hugging Face weights or one GGUF file (with an
Ollama Modelfile).

    tunesmith export runs/first --format gguf --out exported/first
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import log


def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (or an adapter directory) to export; it is only read."),
    fmt: str = typer.Option(
        ..., "--format",
        help="hf: the adapter merged into the base, a Hugging Face safetensors folder. "
        "gguf: one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder to create (new or empty, outside the run directory)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="f32, f16 or bf16 (hf and gguf), q8_0 (gguf only). Default: f32 for hf, f16 for gguf."
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Which adapter of the run: best, last or step-N."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model (name or path) to merge into, instead of the one run.json names; "
        "it must have the same content hash."
    ),
    merge_base: Optional[str] = typer.Option(
        None, "--merge-base", help="QLoRA runs only: nf4 (default) merges into the base as training saw it, "
        "quantized to NF4 and dequantized, so the export computes what was trained; original merges into the "
        "full-precision weights, as `tunesmith serve` runs the adapter."
    ),
) -> None:
    """Export a run as merged Hugging Face weights or GGUF."""
    from tunesmith.models.export import describe, export_run

    result = export_run(
        run, format=fmt, out=out, dtype=dtype, checkpoint=checkpoint, model=model, merge_base=merge_base, log=log,
    )
    typer.echo(describe(result))
