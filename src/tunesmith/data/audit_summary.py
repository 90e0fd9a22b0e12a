"""The human summary of an audit: per check its count and its worst findings.

    tunesmith audit data/banking77/train.csv --input-column text --output-column category
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.audit import CHECKS, ERROR_CHECKS, AuditReport, Finding

SHOWN_PER_CHECK = 5
TITLES = {
    "exact_duplicate": "exact duplicates", "near_duplicate": "near duplicates", "leakage": "leakage",
    "conflicting_answer": "conflicting answers", "suspect_label": "suspect labels", "rare_label": "rare labels",
    "long_example": "extremely long examples", "empty_answer": "empty answers",
    "boilerplate_answer": "boilerplate answers", "pii": "personal data and secrets",
}


def _worst(findings: list[Finding]) -> list[Finding]:
    """The examples worth showing first: most confident, then most similar, then file order."""
    return sorted(findings, key=lambda f: (-(f.confidence or 0), -(f.similarity or 0)))[:SHOWN_PER_CHECK]


def print_audit(report: AuditReport, console: Any) -> None:
    """The summary: files, one line per check with its count, the worst examples of each."""
    for role, info in report.files.items():
        console.print(f"[bold]{role}[/bold] {info['path']}: {info['format']}, {info['examples']:,} examples"
                      + (f" ({info['unreadable_rows']} unreadable rows, see tunesmith validate)"
                         if info["unreadable_rows"] else ""))
    counts = report.counts()
    for check in CHECKS:
        group = report.of(check)
        style = "red" if check in ERROR_CHECKS and group else ("yellow" if group else "green")
        console.print(f"\n[{style}]{TITLES[check]}: {counts[check]:,}[/{style}]" + _check_note(report, check))
        for f in _worst(group):
            extra = f" (confidence {f.confidence:.2f})" if f.confidence is not None else ""
            console.print(f"  {f.file}:{f.line}: {f.message}{extra}", markup=False, highlight=False)
        if len(group) > SHOWN_PER_CHECK:
            console.print(f"  ... and {len(group) - SHOWN_PER_CHECK} more (all of them with --json)")
    verdict = ("[green]no leakage[/green]" if report.ok else
               f"[red]{counts['leakage']} training row(s) leak into the evaluation files[/red]")
    console.print(f"\n{verdict}; --fix OUT writes a cleaned copy (the input is never changed)")


def _check_note(report: AuditReport, check: str) -> str:
    s = report.stats
    if check == "suspect_label":
        info = s.get("label_model")
        if s.get("labels") is None:
            return " (answers are not class labels: check skipped)"
        if info is None:
            return " (skipped)"
        if info.get("skipped"):
            return f" ({info['skipped']})"
        return (f" (out-of-fold accuracy of a {info['classifier']} classifier: {info['out_of_fold_accuracy']:.1%} "
                f"on {info['rows']:,} rows, {info['labels']} labels)")
    if check == "rare_label" and s.get("labels"):
        return f" ({len(s['labels'])} labels, largest / smallest = {s['imbalance_ratio']})"
    if check == "long_example" and s.get("lengths"):
        d = s["lengths"]
        return f" (median {d['p50']:,} {d['unit']}, p95 {d['p95']:,}, max {d['max']:,}; long above {d['long_above']:,})"
    if check == "near_duplicate":
        return f" (Jaccard >= {report.threshold} on character 3-grams)"
    return ""
