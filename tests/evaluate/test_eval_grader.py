"""`tunesmith eval --grader`: the tiny model's answers scored by a grader, per row and on average."""

from __future__ import annotations

import json

from eval_helpers import run_cli, write_label_csv


def test_eval_with_a_grader_reports_the_mean_and_per_row_scores(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 4, "t")
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({
        "type": "multi", "name": "both", "calculate_output": "label + 0.5 * echo",
        "graders": {
            "label": {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                      "reference": "{{item.reference}}", "operation": "eq"},
            "echo": {"type": "python", "name": "echo",
                     "source": "def grade(sample, item):\n    return float(item['input'].startswith('t '))\n"},
        }}))
    out = tmp_path / "ev"
    proc = run_cli("eval", "--model", tiny_model_dir, "--data", test, "--out", out, "--max-new-tokens", "4",
                   "--grader", grader)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["grader_reward"] == float(row["prediction"] == row["reference"]) + 0.5
        assert row["grader_error"] is None
        assert f"line {row['line']}: {row['grader_reward']:.4f}" in proc.stdout
    summary = json.loads((out / "metrics.json").read_text())["grader"]
    mean = sum(r["grader_reward"] for r in rows) / 4
    assert summary == {"grader": "both", "type": "multi", "rows": 4, "mean": mean, "grader_errors": 0}
    assert f"both (multi): mean {mean:.4f} over 4 rows, 0 grader error(s)" in proc.stdout


def test_eval_refuses_a_bad_grader_before_loading_the_model(tmp_path):
    grader = tmp_path / "g.json"
    grader.write_text('{"type": "string_check", "name": "x"}')
    proc = run_cli("eval", "--model", "no-such-model-dir", "--data", tmp_path / "none.csv", "--grader", grader)
    assert proc.returncode == 2 and "missing field 'grader.input'" in proc.stderr
