"""Check a fine-tuning file the way `tunesmith validate` does, for uploads and jobs.

The API stores every upload, records what the check found, and a job that names a file
with errors fails in `validating_files` with these line-numbered problems.

    python -c "from tunesmith.jobs.validation import check_file; print(check_file('train.jsonl'))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.audit import audit_data
from tunesmith.data.example import ColumnMapping
from tunesmith.data.formats import read_data
from tunesmith.data.near_duplicates import require_audit_packages
from tunesmith.data.prompts import PROMPTS_FORMAT, read_prompt_rows
from tunesmith.data.validate import validate_data
from tunesmith.errors import TunesmithError, UsageError

MIN_EXAMPLES = 10
"""Hosted fine-tuning refuses fewer; so does tunesmith's API."""


AUDIT_CHECKS = ("near_duplicate", "conflicting_answer", "leakage")
"""What a job's validation adds from `tunesmith audit` (validate already finds exact
duplicates and exact overlap); suspect labels are left to the CLI (a classifier per job)."""


PAIR_FORMAT = "preference"
"""The format dpo jobs train on; supervised jobs take the others."""


@dataclass
class FileCheck:
    examples: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    format: str | None = None
    """chat, prompt_completion, alpaca or preference (None when the file could not be read)."""
    audit: str | None = None
    """One line: what the content audit found, with the command that shows all of it."""

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


def check_file(path: str | Path, model: str | None = None, min_examples: int = MIN_EXAMPLES,
               validation: str | Path | None = None, leakage_error: bool = False,
               columns: ColumnMapping | None = None) -> FileCheck:
    """Errors and warnings for one JSONL file.

    With a model: `tunesmith validate`'s checks (`validate_data`: rendering through the
    model's template, lengths, trained tokens, duplicates, and overlap with `validation`).
    Without one (at upload, when the model is not known yet): the shared readers' parse
    checks, which give the same line-numbered codes for broken JSON, unknown roles and
    missing fields. `columns` reads a CSV/TSV file (a sweep's jobs, whose settings name the
    columns; the API takes JSONL only).

    With a model, the content audit's duplicate and leakage checks run too (when the audit
    extra is installed): near duplicates, conflicting answers and training rows that repeat a
    validation row are warnings, or, for leakage with `leakage_error`, errors.
    """
    if model is not None:
        report = validate_data(Path(path), model=model, validation=validation, estimate=False, columns=columns)
        check = FileCheck(
            examples=report.examples,
            errors=[p.to_dict() for p in report.errors if p.code != "too_few_examples"],
            warnings=[p.to_dict() for p in report.warnings],
            format=report.format,
        )
        _add_audit(check, Path(path), validation, leakage_error)
    else:
        check = _parse_only(Path(path))
    if check.ok and check.examples < min_examples:
        check.errors.append({
            "line": 0, "field": "", "code": "too_few_examples",
            "message": f"the file holds {check.examples} example(s); this needs at least {min_examples}",
        })
    return check


def _add_audit(check: FileCheck, path: Path, validation: str | Path | None, leakage_error: bool) -> None:
    if check.format not in ("chat", "prompt_completion", "alpaca", PAIR_FORMAT) or not check.examples:
        return
    if leakage_error:
        for w in [w for w in check.warnings if w["code"] == "validation_overlap"]:
            check.warnings.remove(w)
            check.errors.append(w)
    problems, check.audit = audit_problems(path, validation)
    for p in problems:
        (check.errors if p["code"] == "leakage" and leakage_error else check.warnings).append(p)


def audit_problems(path: Path, validation: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    """The content audit's near duplicates, conflicting answers and leaked rows of a training
    file, as line-numbered problems, and one line saying what it found and which command
    shows everything (or why it was skipped)."""
    try:
        require_audit_packages()
    except UsageError as exc:
        return [], f"content audit skipped: {exc}"
    report = audit_data(path, validation=validation, labels=False)
    problems = [{"line": f.line, "field": "", "code": f.check, "message": f.message}
                for f in report.findings if f.check in AUDIT_CHECKS and f.file == report.files["train"]["name"]]
    counts = report.counts()
    found = ", ".join(f"{counts[c]} {c.replace('_', ' ')}" for c in AUDIT_CHECKS if counts[c])
    return problems, (f"content audit: {found or 'no near duplicates, conflicting answers or leakage'}; "
                      "`tunesmith audit TRAIN --validation VAL` shows every finding, suspect labels and personal "
                      "data, and writes a cleaned copy")


def check_prompt_file(path: str | Path, min_examples: int = 1) -> FileCheck:
    """A reinforcement job's file: prompt rows (data.prompts), each line's problems with its number."""
    try:
        rows, problems = read_prompt_rows(path)
    except TunesmithError as exc:
        return FileCheck(errors=[{"line": 0, "field": "", "code": "unreadable_file", "message": str(exc)}])
    check = FileCheck(examples=len(rows), errors=[p.to_dict() for p in problems], format=PROMPTS_FORMAT)
    if check.ok and check.examples < min_examples:
        check.errors.append({"line": 0, "field": "", "code": "too_few_examples",
                             "message": f"the file holds {check.examples} prompt(s); this needs at least {min_examples}"})
    return check


def _parse_only(path: Path) -> FileCheck:
    try:
        result = read_data(path)
    except TunesmithError as exc:
        return FileCheck(errors=[{"line": 0, "field": "", "code": "unreadable_file", "message": str(exc)}])
    if result.errors and result.format == "chat":  # rows with fields beside messages: a reinforcement file?
        prompts = check_prompt_file(path)
        if prompts.ok:
            return prompts
    if result.format not in ("chat", "prompt_completion", "alpaca", PAIR_FORMAT):
        return FileCheck(errors=[{
            "line": 0, "field": "", "code": "unsupported_format",
            "message": f"the file is in {result.format} format; jobs take chat, prompt/completion or alpaca JSONL "
                       "(supervised) or preference pairs (dpo)",
        }])
    return FileCheck(
        examples=len(result.examples) + len(result.preferences),
        errors=[p.to_dict() for p in result.errors],
        warnings=[p.to_dict() for p in result.warnings],
        format=result.format,
    )


def method_mismatch(check: FileCheck, method: str) -> str | None:
    """Why a file of this format cannot train a job of this method type, or None."""
    if check.format == PROMPTS_FORMAT and method != "reinforcement":
        return ("it holds prompts without answers (and fields for a grader), which only reinforcement fine-tuning "
                "can use; create the job with method {\"type\": \"reinforcement\"} and a grader")
    if check.format is None or (check.format == PAIR_FORMAT) == (method == "dpo"):
        return None
    if method == "dpo":
        return (f"it holds supervised examples ({check.format} format), but a dpo job trains on preference pairs "
                "(prompt/chosen/rejected or input/preferred_output/non_preferred_output lines); "
                "use method type supervised for this file")
    return ("it holds preference pairs (a prompt with a chosen and a rejected answer), which supervised training "
            "cannot use; create the job with method {\"type\": \"dpo\"}")
