"""The `tunesmith` command line called inside the test process.

Each child `tunesmith` process spends seconds importing torch, transformers and peft before
it does anything (about 5 s of CPU on the 2-core test machine), which made those imports the
largest single cost of `make test`. Tests that check what a command writes, prints and exits
with call the same `tunesmith.cli.main` here instead, through the same argument parsing and
the same error handling; every command keeps at least one test that runs the real
executable in a child process (start-up, console script, output that only a real process
shows, such as library warnings and progress bars on stderr).

Imported by name (`from in_process import run_tunesmith`), like tests/tiny_model.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout


def run_tunesmith(*args: object, env: dict[str, str | None] | None = None,
                  stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `tunesmith ARGS` in this process: exit code, stdout and stderr as a child's would be.

    `env` is added to the environment for the call only (None removes a variable); the
    environment, `sys.argv` and `sys.stdin` are restored afterwards (main() sets a default
    for HF_HUB_DISABLE_PROGRESS_BARS).
    An exception that main() does not turn into a message propagates, so the test fails with
    its traceback, as a child's "Traceback" in stderr would fail the test's checks.
    """
    from tunesmith.cli import main

    argv = ["tunesmith", *map(str, args)]
    saved_env, saved_argv, saved_stdin = dict(os.environ), sys.argv, sys.stdin
    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    try:
        for name, value in (env or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.argv = argv
        sys.stdin = io.StringIO(stdin or "")
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:  # sys.exit("message"): Python prints it and exits with 1
                    print(exit_.code, file=sys.stderr)
                    code = 1
    finally:
        _restore_environ(saved_env)
        sys.argv, sys.stdin = saved_argv, saved_stdin
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _restore_environ(saved: dict[str, str]) -> None:
    """Put os.environ back key by key (never cleared: threads of the test session's servers
    may read it meanwhile)."""
    for name in [n for n in os.environ if n not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
