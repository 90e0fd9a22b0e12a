"""Check a fine-tuning file the way `tunesmith validate` does, for uploads and jobs.

The API stores every upload, records what the check found, and a job that names a file
with errors fails in `validating_files` with these line-numbered problems.

    python -c "from tunesmith.jobs.validation import check_file; print(check_file('train.jsonl'))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_EXAMPLES = 10
"""Hosted fine-tuning refuses fewer; so does tunesmith's API."""


@dataclass
class FileCheck:
    examples: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "errors": self.errors, "warnings": self.warnings}

    def summary(self, name: str, limit: int = 5) -> str:
        """One sentence naming the first problems with their lines and codes."""
        shown = "; ".join(f"line {p['line']} ({p['code']}): {p['message']}" for p in self.errors[:limit])
        more = f"; and {len(self.errors) - limit} more" if len(self.errors) > limit else ""
        return f"{name} has {len(self.errors)} error(s): {shown}{more}"


def check_file(path: str | Path, model: str | None = None, min_examples: int = MIN_EXAMPLES) -> FileCheck:
    """Errors and warnings for one JSONL file; with a model, rendered through its template.

    Uses the data area's validator (`tunesmith validate`) when it is installed; otherwise
    parses the file with the shared readers, which report the same line-numbered codes for
    broken JSON, unknown roles and missing fields.
    """
    try:
        from tunesmith.data.validate import validate_data  # noqa: F401
    except ImportError:
        validate_data = None
    if validate_data is not None and model is not None:
        report = validate_data(Path(path), model=model)
        as_dict = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        check = FileCheck(
            examples=int(as_dict.get("examples", as_dict.get("n_examples", 0)) or 0),
            errors=list(as_dict.get("errors", [])),
            warnings=list(as_dict.get("warnings", [])),
        )
    else:
        check = _parse_only(Path(path))
    if check.ok and check.examples < min_examples:
        check.errors.append({
            "line": 0, "field": "", "code": "too_few_examples",
            "message": f"the file holds {check.examples} example(s); this needs at least {min_examples}",
        })
    return check


def _parse_only(path: Path) -> FileCheck:
    from tunesmith.data.formats import read_data
    from tunesmith.errors import TunesmithError

    try:
        result = read_data(path)
    except TunesmithError as exc:
        return FileCheck(errors=[{"line": 0, "field": "", "code": "unreadable_file", "message": str(exc)}])
    if result.format not in ("chat", "prompt_completion", "alpaca"):
        return FileCheck(errors=[{
            "line": 0, "field": "", "code": "unsupported_format",
            "message": f"the file is in {result.format} format; supervised jobs take chat, prompt/completion or alpaca JSONL",
        }])
    return FileCheck(
        examples=len(result.examples),
        errors=[p.to_dict() for p in result.errors],
        warnings=[p.to_dict() for p in result.warnings],
    )
