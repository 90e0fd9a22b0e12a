"""`tunesmith grade` end to end, on files it leaves: the real CLI in a child process for the
first test, the same command line in this process (tests/in_process.py) for the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from in_process import run_tunesmith

GRADER = {"type": "multi", "name": "combo", "calculate_output": "0.5 * label + 0.5 * short",
          "graders": {"label": {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                                "reference": "{{item.label}}", "operation": "ilike"},
                      "short": {"type": "python", "name": "short",
                                "source": "def grade(sample, item):\n    return float(len(sample['output_text']) < 20)\n"}}}


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tunesmith.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ}, timeout=300)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grade_prints_per_row_scores_and_the_mean(tmp_path):
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps(GRADER))
    data = write(tmp_path / "rows.jsonl", [
        {"model_sample": "Refund", "item": {"label": "refund"}},
        {"model_sample": "this is a refund request, clearly", "item": {"label": "refund"}},
        {"model_sample": "card", "item": {"label": "refund"}},
        {"model_sample": "x", "item": {}},
    ])
    out = tmp_path / "grades.jsonl"
    proc = run_cli("grade", "--grader", grader, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["line 1: 1.0000", "line 2: 0.5000", "line 3: 0.5000"]
    assert lines[3].startswith("line 4: 0.5000  grader error: label: template {{item.label}}: item has no field 'label'")
    assert "combo (multi): mean 0.6250 over 4 rows, 1 grader error(s)" in proc.stdout
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in written] == [1.0, 0.5, 0.5, 0.5]
    assert written[3]["metadata"]["errors"]["invalid_variable_error"] is True
    assert written[0]["sub_rewards"] == {"label": 1.0, "short": 1.0}


def test_a_malformed_grader_file_names_the_file_and_field(tmp_path):
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({**GRADER["graders"]["label"], "operation": "equals"}))
    data = write(tmp_path / "rows.jsonl", [{"model_sample": "x", "item": {}}])
    proc = run_tunesmith("grade", "--grader", grader, "--data", data)
    assert proc.returncode == 2
    assert f"--grader {grader}: invalid 'grader.operation'" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_rows_are_all_reported_with_their_lines(tmp_path):
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps(GRADER["graders"]["label"]))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"model_sample": "x"}\nnot json\n{"sample": "x"}\n')
    proc = run_tunesmith("grade", "--grader", grader, "--data", data)
    assert proc.returncode == 1
    assert "line 2: not JSON" in proc.stderr and 'line 3: needs "model_sample"' in proc.stderr
