"""`tunesmith eval --grader g.json`: grade each answer of an evaluation with a grader.

Each answer is the sample (`{{sample.output_text}}`); the item is the example's
`{"input": <last user message>, "reference": <reference answer>, "line": <line in the file>}`.
The rows of predictions.jsonl gain `grader_reward` and `grader_error`, metrics.json gains
`grader` (mean, grader errors, pass rate).

    tunesmith eval --model smollm2-135m-instruct --data test.jsonl --grader g.json
"""

from __future__ import annotations

from typing import Any

from tunesmith.evaluate.evaluation import EvalResult
from tunesmith.graders.files import summarize
from tunesmith.graders.judge import Endpoint
from tunesmith.graders.run import Grading


def grade_eval(result: EvalResult, grader: Any, endpoint: Endpoint = Endpoint()) -> dict[str, Any]:
    """Grade every prediction of `result` in place; returns (and stores in its metrics) the summary."""
    grades = []
    with Grading(grader, endpoint) as grading:
        for row in result.predictions:
            item = {"input": row["input"], "reference": row["reference"], "line": row["line"]}
            grade = grading.run(row["prediction"], item)
            row["grader_reward"] = grade.reward
            row["grader_error"] = grade.error_text() if grade.error else None
            grades.append(grade)
    summary = summarize(grader, grades)
    result.metrics["grader"] = summary
    return summary
