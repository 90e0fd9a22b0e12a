"""The command table: every command answers --help, `tunesmith --help` lists them all
without loading a heavy library, and typer stays inside cli/.

    pytest tests/cli
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli import COMMANDS, app

SRC = Path(__file__).resolve().parents[2] / "src" / "tunesmith"
TUNESMITH = str(Path(sys.executable).parent / "tunesmith")
HEAVY = ["torch", "transformers", "peft", "accelerate", "numpy", "fastapi", "uvicorn", "sqlalchemy", "openai", "httpx"]


def _table() -> list[tuple[list[str], object]]:
    rows = []
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            rows += [([name, sub], func) for sub, func in entry.items()]
        else:
            rows.append(([name], entry))
    return rows


@pytest.mark.parametrize("words,func", _table(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_command_in_the_table_answers_help(words, func):
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"Usage: tunesmith {' '.join(words)} [OPTIONS]" in result.output
    summary = func.__doc__.strip().splitlines()[0]
    assert " ".join(summary.split()) in " ".join(result.output.split())


def test_tunesmith_help_lists_every_command_and_loads_no_heavy_library():
    probe = (
        "import sys\nfrom tunesmith.cli import main\nsys.argv = ['tunesmith', '--help']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^│ (\S+)\s", proc.stdout, flags=re.M)
    assert [c for c in listed if not c.startswith("-")] == list(COMMANDS)
    assert "HEAVY []" in proc.stdout  # `tunesmith --help` answers at once


@pytest.mark.parametrize("argv", [[TUNESMITH], [sys.executable, "-m", "tunesmith"], [sys.executable, "-m", "tunesmith.cli"]],
                         ids=["console-script", "python-m-tunesmith", "python-m-tunesmith.cli"])
def test_entry_points_run_the_same_app(argv):
    """pyproject's `tunesmith = tunesmith.cli:main`, the jobs worker's `python -m tunesmith` and
    train --nproc's `python -m tunesmith.cli` all reach the table."""
    proc = subprocess.run([*argv, "models", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Base models available offline (pull, list)." in proc.stdout


def test_only_cli_imports_typer():
    importers = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "typer" or n.startswith("typer.") for n in names):
                importers.append(path.relative_to(SRC))
    assert importers and all(p.parts[0] == "cli" for p in importers), importers


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, tiny_model_dir):
    """Typer turns Ctrl-C into a silent exit 130: `tunesmith eval` stopped without a word."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {k}"},
                                                     {"role": "assistant", "content": "yes"}]}) + "\n"
                            for k in range(5000)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from tunesmith.cli import main; main()", "eval",
                             "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "64",
                             "--no-loss", "--no-trackers", "--out", str(tmp_path / "eval")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while "evaluating on" not in (line := proc.stderr.readline()):  # generating now
            assert line or proc.poll() is None, "eval ended before generating"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert "Traceback" not in stderr
