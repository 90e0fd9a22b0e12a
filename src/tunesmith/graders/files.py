"""Graders and rows from files, and the summary of many grades: what `tunesmith grade` and
`tunesmith eval --grader` read and print.

A grader file is one grader as JSON (what the graders API takes as `grader`). A rows file is
JSONL, one `{"model_sample": "...", "item": {...}}` per line (a graders.run request without
the grader).

    tunesmith grade --grader g.json --data rows.jsonl
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from tunesmith.errors import DataError, UsageError
from tunesmith.graders.run import GradeResult, validate_grader
from tunesmith.graders.types import GraderError, parse_grader


def load_grader(path: str | Path) -> Any:
    """The validated grader in a JSON file; errors name the file and the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--grader {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"--grader {path} is not JSON ({exc}); give one grader object") from None
    try:
        grader = parse_grader(obj)
        validate_grader(grader)
    except GraderError as exc:
        raise GraderError(f"--grader {path}: {exc}", exc.param) from None
    return grader


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file of {"model_sample", "item"}; every problem in one error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"--data {path}: cannot read it ({exc.strerror})") from None
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {number}: not JSON ({exc})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("model_sample"), str):
            problems.append(f"line {number}: needs \"model_sample\": a string (the answer graded)")
            continue
        unknown = set(row) - {"model_sample", "item"}
        if unknown:
            problems.append(f"line {number}: unknown key(s) {sorted(unknown)}; a row is model_sample and item")
            continue
        rows.append({"line": number, "model_sample": row["model_sample"], "item": row.get("item")})
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    if not rows:
        raise DataError(f"{path} has no rows; each line is {{\"model_sample\": \"...\", \"item\": {{...}}}}")
    return rows


def summarize(grader: Any, results: Sequence[GradeResult]) -> dict[str, Any]:
    """Mean reward, grader errors and (with a pass_threshold) the pass rate, over `results`."""
    rewards = [r.reward for r in results]
    summary: dict[str, Any] = {
        "grader": grader.name, "type": grader.type, "rows": len(results),
        "mean": sum(rewards) / len(rewards) if rewards else math.nan,
        "grader_errors": sum(r.error for r in results),
    }
    passed = [r.passed for r in results if r.passed is not None]
    if passed:
        summary["pass_rate"] = sum(passed) / len(passed)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    text = f"{summary['grader']} ({summary['type']}): mean {summary['mean']:.4f} over {summary['rows']} rows"
    if "pass_rate" in summary:
        text += f", {100 * summary['pass_rate']:.1f}% pass"
    return text + f", {summary['grader_errors']} grader error(s)"
