"""The `tunesmith` command line: a table of command -> function, one module per group of
commands. Each command imports its implementation in its body, so `tunesmith --help`
answers at once; failures the user can fix print one sentence.

    tunesmith --help
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Union

import typer

from tunesmith.cli import audit, data, distill, evaluate, export, graders, models, serve, sweep, train
from tunesmith.errors import TunesmithError

HELP = ("Fine-tune open-weight language models on your own data: validate, train (LoRA, full, DPO, QLoRA), "
        "evaluate, serve with fine-tuning jobs, export, distil.")

# In the order `tunesmith --help` lists them; a nested table is a group (`tunesmith models pull`).
COMMANDS: dict[str, Union[Callable, dict[str, Callable]]] = {
    "validate": data.validate_cmd,
    "inspect": data.inspect_cmd,
    "audit": audit.audit_cmd,
    "train": train.train_cmd,
    "sweep": sweep.sweep_cmd,
    "eval": evaluate.eval_cmd,
    "grade": graders.grade_cmd,
    "compare": evaluate.compare_cmd,
    "report": evaluate.report_cmd,
    "demo": evaluate.demo_cmd,
    "distill": distill.distill_cmd,
    "serve": serve.serve_cmd,
    "chat": serve.chat_cmd,
    "worker": serve.worker_cmd,
    "export": export.export_cmd,
    "models": {"pull": models.pull_cmd, "list": models.list_cmd},
}
GROUP_HELP = {"models": models.HELP}


def build_app() -> typer.Typer:
    """The typer app with every command of COMMANDS registered."""
    app = typer.Typer(name="tunesmith", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = typer.Typer(help=GROUP_HELP[name], no_args_is_help=True)
            for sub, func in entry.items():
                group.command(sub)(func)
            app.add_typer(group, name=name)
        else:
            app.command(name)(entry)
    return app


app = build_app()


def main() -> None:
    """Console entry point: run the app, turn TunesmithError into a message and exit code."""
    # tunesmith reports its own progress (steps, tokens/s, ETA) for long work; the bars that
    # transformers draws for each model load and save ("Loading weights") only interleave
    # with it. HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Typer turns a KeyboardInterrupt into a silent exit 130, so Ctrl-C is noted here to say so.
    interrupted: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        app()
    except TunesmithError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and interrupted:
            typer.echo("interrupted", err=True)
        raise
