"""`tunesmith validate` and `tunesmith inspect`: a data file seen through the model's chat
template, before any training.

    tunesmith validate train.jsonl --validation valid.jsonl
    tunesmith inspect train.jsonl -n 5
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import PROMPT_COLUMN_HELP, log
from tunesmith.models.registry import DEFAULT_MODEL

FORMAT_HELP = "Data format: chat, prompt_completion, alpaca, preference, csv, tsv (default: detected)."
ANSWER_COLUMN_HELP = "CSV/TSV column holding the answer."
SYSTEM_HELP = "System message added to every CSV/TSV example."


def build_columns(input_column: Optional[str], output_column: Optional[str], system: Optional[str]):
    from tunesmith.data.formats import ColumnMapping

    return ColumnMapping(input_column=input_column or "text", output_column=output_column, system=system)


def validate_cmd(
    path: Path = typer.Argument(..., help="Training data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model whose chat template and tokenizer count the tokens."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Training sequence length in tokens; longer examples are truncated."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation file: checked too, and overlap with training reported."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help=PROMPT_COLUMN_HELP),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=ANSWER_COLUMN_HELP),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
    price_per_million: Optional[float] = typer.Option(None, "--price-per-million", help="Hosted price per million training tokens, to compare costs."),
) -> None:
    """Check a data file through the model's chat template before training (exit 0 valid, 1 invalid, 2 usage)."""
    from rich.console import Console

    from tunesmith.data.validate import print_report, report_json, validate_data
    from tunesmith.train.speed import measure_train_tokens_per_s

    report = validate_data(
        path, model=model, max_seq_len=max_seq_len, validation=validation, format=format,
        columns=build_columns(input_column, output_column, system), price_per_million=price_per_million,
        log=log, measure_speed=measure_train_tokens_per_s,
    )
    if json_out:
        typer.echo(report_json(report))
    else:
        print_report(report, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(0 if report.ok else 1)


def inspect_cmd(
    path: Path = typer.Argument(..., help="Data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model whose chat template renders the examples."),
    n: int = typer.Option(3, "-n", "--examples", help="How many examples to show."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Show truncation at this many tokens."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help=PROMPT_COLUMN_HELP),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=ANSWER_COLUMN_HELP),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
) -> None:
    """Show the first examples exactly as the model sees them, trained tokens highlighted."""
    from rich.console import Console

    from tunesmith.data.inspection import inspect_data, print_inspection

    items, problems = inspect_data(
        path, model=model, n=n, max_seq_len=max_seq_len, format=format,
        columns=build_columns(input_column, output_column, system),
    )
    console = Console(highlight=False, soft_wrap=True)
    print_inspection(items, problems, console, plain=not console.is_terminal)
