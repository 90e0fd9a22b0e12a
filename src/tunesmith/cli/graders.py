"""`tunesmith grade`: run a grader (OpenAI's shapes) over a JSONL file of answers and items.

    tunesmith grade --grader g.json --data rows.jsonl --out grades.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

JUDGE_BASE_URL_HELP = ("Where score_model and label_model judges are asked, an OpenAI-compatible endpoint such as "
                       "http://127.0.0.1:8000/v1 (tunesmith serve). Default: $OPENAI_BASE_URL or OpenAI's.")
JUDGE_API_KEY_HELP = "The judges' API key (default: $OPENAI_API_KEY); never written."


def grade_cmd(
    grader: Path = typer.Option(..., "--grader", help="One grader as JSON, in OpenAI's shape (string_check, text_similarity, python, score_model, label_model, multi)."),
    data: Path = typer.Option(..., "--data", help='JSONL, one {"model_sample": "...", "item": {...}} per line.'),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write one JSON line per row: line, reward and the graders.run result."),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help=JUDGE_BASE_URL_HELP),
    judge_api_key: Optional[str] = typer.Option(None, "--judge-api-key", help=JUDGE_API_KEY_HELP),
) -> None:
    """Score answers with a grader: the per-row scores, then the mean."""
    import json

    from tunesmith.fileio import write_atomically
    from tunesmith.graders.files import format_summary, load_grader, load_rows, summarize
    from tunesmith.graders.judge import Endpoint
    from tunesmith.graders.run import Grading

    spec = load_grader(grader)
    rows = load_rows(data)
    results, lines = [], []
    with Grading(spec, Endpoint(judge_base_url, judge_api_key)) as grading:
        for row in rows:
            result = grading.run(row["model_sample"], row["item"])
            results.append(result)
            why = f"  grader error: {result.error_text()}" if result.error else ""
            typer.echo(f"line {row['line']}: {result.reward:.4f}{why}")
            lines.append(json.dumps({"line": row["line"], "reward": result.reward, **result.to_openai()}))
    typer.echo(format_summary(summarize(spec, results)))
    if out is not None:
        write_atomically(out, "".join(line + "\n" for line in lines))
        typer.echo(f"wrote {out}")
