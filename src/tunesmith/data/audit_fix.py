"""`tunesmith audit --fix OUT`: a cleaned copy of the training file, never the input itself.

Dropped: exact duplicates, every near-duplicate after the first of its cluster (each
near-duplicate finding points at an earlier row, so the earliest stays), and training rows
that leak a test or validation row. Optionally, suspect labels at or above a confidence are
dropped or relabelled with the suggested label. Kept rows are copied unchanged, byte for
byte for JSONL; a relabelled JSONL line is re-encoded with only its answer changed.

    tunesmith audit train.jsonl --test test.jsonl --fix train.clean.jsonl --fix-labels relabel
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.audit import AuditReport
from tunesmith.data.example import ColumnMapping
from tunesmith.data.formats import iter_lines
from tunesmith.errors import UsageError

LABEL_ACTIONS = ("drop", "relabel")
DROPPED_CHECKS = ("exact_duplicate", "near_duplicate", "leakage")


@dataclass
class FixResult:
    out: Path
    kept: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)
    """check -> training lines dropped for it."""
    relabelled: list[tuple[int, str, str]] = field(default_factory=list)
    """(line, old label, new label)."""

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "kept": self.kept, "dropped": self.dropped,
                "relabelled": [{"line": ln, "label": a, "new_label": b} for ln, a, b in self.relabelled]}


def write_fixed(report: AuditReport, out: Path, columns: ColumnMapping | None = None,
                labels: str | None = None, min_confidence: float = 0.9) -> FixResult:
    """Write the cleaned copy of the report's training file to `out`."""
    train = report.files["train"]
    src = Path(train["path"])
    out = Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise UsageError(f"--fix {out} is the training file itself; audit never modifies its input, give a new path")
    if labels is not None and labels not in LABEL_ACTIONS:
        raise UsageError(f"--fix-labels must be one of {', '.join(LABEL_ACTIONS)}, got {labels!r}")
    if not 0.0 <= min_confidence <= 1.0:
        raise UsageError(f"--min-confidence is between 0 and 1, got {min_confidence}")
    result = FixResult(out=out)
    drop: dict[int, str] = {}
    for check in DROPPED_CHECKS:
        for f in report.of(check):
            if f.file == train["name"] and f.line not in drop:
                drop[f.line] = check
    relabel: dict[int, str] = {}
    if labels is not None:
        for f in report.of("suspect_label"):
            if f.confidence is not None and f.confidence >= min_confidence and f.line not in drop:
                if labels == "drop":
                    drop[f.line] = "suspect_label"
                else:
                    relabel[f.line] = f.details["suggested_label"]
    for line, check in sorted(drop.items()):
        result.dropped.setdefault(check, []).append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if train["format"] in ("csv", "tsv"):
        _write_table(src, tmp, train["format"], columns or ColumnMapping(), drop, relabel, result)
    else:
        _write_jsonl(src, tmp, train["format"], drop, relabel, result)
    tmp.replace(out)
    return result


def _write_jsonl(src: Path, dest: Path, fmt: str, drop: dict[int, str], relabel: dict[int, str],
                 result: FixResult) -> None:
    with open(dest, "w", encoding="utf-8") as fh:
        for line, text, err in iter_lines(src):
            if line in drop or text is None:
                continue
            if line in relabel:
                obj = json.loads(text)
                old = _set_answer(obj, fmt, relabel[line])
                if old is not None:
                    result.relabelled.append((line, old, relabel[line]))
                    text = json.dumps(obj, ensure_ascii=False)
            fh.write(text + "\n")
            result.kept += 1


def _set_answer(obj: dict[str, Any], fmt: str, label: str) -> str | None:
    """Replace the answer the audit read as the label; returns the old one (None if unchanged)."""
    if fmt == "chat":
        for msg in reversed(obj.get("messages", [])):
            if msg.get("role") == "assistant":
                old, msg["content"] = msg.get("content"), label
                return old
        return None
    for key in {"prompt_completion": ("completion", "response"), "alpaca": ("output",)}.get(fmt, ()):
        if key in obj:
            old, obj[key] = obj[key], label
            return old
    return None


def _write_table(src: Path, dest: Path, fmt: str, columns: ColumnMapping, drop: dict[int, str],
                 relabel: dict[int, str], result: FixResult) -> None:
    delimiter = "\t" if fmt == "tsv" else ","
    with open(src, encoding="utf-8-sig", newline="") as fh, open(dest, "w", encoding="utf-8", newline="") as out:
        reader = csv.reader(fh, delimiter=delimiter)
        writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
        header = next(reader, None)
        if header is None:
            return
        writer.writerow(header)
        i_out = header.index(columns.output_column) if columns.output_column in header else None
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if line in drop:
                continue
            if line in relabel and i_out is not None:
                result.relabelled.append((line, row[i_out], relabel[line]))
                row = list(row)
                row[i_out] = relabel[line]
            writer.writerow(row)
            result.kept += 1


def print_fix(result: FixResult, console: Any) -> None:
    parts = [f"{len(lines)} {check.replace('_', ' ')}" for check, lines in result.dropped.items()]
    console.print(f"\nwrote {result.out}: kept {result.kept:,} row(s)"
                  + (f"; dropped {', '.join(parts)}" if parts else "; dropped none")
                  + (f"; relabelled {len(result.relabelled)}" if result.relabelled else ""),
                  markup=False, highlight=False)
    for check, lines in result.dropped.items():
        console.print(f"  dropped ({check}): lines {_lines(lines)}", markup=False, highlight=False)
    for line, old, new in result.relabelled[:20]:
        console.print(f"  line {line}: {old!r} -> {new!r}", markup=False, highlight=False)
    if len(result.relabelled) > 20:
        console.print(f"  ... and {len(result.relabelled) - 20} more relabelled (all with --json)")


def _lines(lines: list[int], limit: int = 30) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


