"""What more than one command module shares: help texts that must read the same on every
command taking the option, and the progress log on standard error.

    tunesmith validate --help; tunesmith distill --help    # the same --input-column text
"""

from __future__ import annotations

import typer

PROMPT_COLUMN_HELP = "CSV/TSV column holding the prompt."
WEIGHTS_HELP = ("How the base's linear layers are stored: fp32, or int8 (one scale per output channel; the LM head "
                "and adapters stay fp32; decode reads less than half the bytes, an answer may differ from fp32's).")


def log(msg: str) -> None:
    """Progress and file names go to stderr, so stdout carries only the command's result."""
    typer.echo(msg, err=True)
