"""Audit a training file's content before training: duplicates, train/test leakage,
conflicting answers, suspect labels, label and length distribution, personal data.

One streamed pass per file keeps only each example's prompt text, its answer and a few
numbers; the near-duplicate search (MinHash LSH, `near_duplicates`) and the label check
(cross-validated classifier + cleanlab, `label_issues`) then run on those. Every finding
carries its file and line, and the other file's line for cross-file ones.

    tunesmith audit data/banking77/train.csv --test data/banking77/test.csv \
        --input-column text --output-column category
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.example import ColumnMapping, Example, PreferenceExample, Problem
from tunesmith.data.formats import check_path, iter_records, resolve_format
from tunesmith.data.label_issues import find_suspect_labels
from tunesmith.data.near_duplicates import (
    DEFAULT_THRESHOLD,
    NearIndex,
    chunked,
    jaccard_normalized,
    normalize,
    require_audit_packages,
)
from tunesmith.data.pii import find_pii
from tunesmith.data.render import render_examples
from tunesmith.data.validate import MAX_LABELS
from tunesmith.errors import UsageError

CHECKS = ("exact_duplicate", "near_duplicate", "leakage", "conflicting_answer", "suspect_label",
          "rare_label", "long_example", "empty_answer", "boilerplate_answer", "pii")
"""Every finding's `check`, in the order the report lists them."""
ERROR_CHECKS = ("leakage",)
"""Findings that make the audit fail (exit 1): a test row in training makes its score a memory test."""
RENDER_CHUNK = 512
LONG_IQR = 3.0
"""An example is extremely long above Tukey's far-out fence (Q3 + 3 x IQR) of the file's
lengths and above twice the median: the fence alone flags 4% of banking77's rows counted in
characters, whose lengths are skewed."""
RARE_SHARE = 0.2
"""A label is rare with fewer rows than this share of the median label's (or fewer than 5)."""
BOILERPLATE = re.compile(
    r"^\s*(as an ai(?: language model)?|i(?:'m| am) (?:sorry|unable|not able)|i cannot (?:help|assist)"
    r"|lorem ipsum|todo\b|n/?a\s*$|none\s*$|null\s*$|\.\.\.\s*$)",
    re.IGNORECASE,
)


@dataclass
class Finding:
    check: str
    file: str
    line: int
    message: str
    other_file: str | None = None
    other_line: int | None = None
    similarity: float | None = None
    confidence: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"check": self.check, "file": self.file, "line": self.line, "message": self.message}
        for key in ("other_file", "other_line", "similarity", "confidence"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.details}


@dataclass
class AuditReport:
    """What `tunesmith audit` found; `to_dict()` is the `--json` output."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    threshold: float = DEFAULT_THRESHOLD

    @property
    def ok(self) -> bool:
        return not any(f.check in ERROR_CHECKS for f in self.findings)

    def counts(self) -> dict[str, int]:
        c = Counter(f.check for f in self.findings)
        return {check: c[check] for check in CHECKS}

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "threshold": self.threshold, "files": self.files, "counts": self.counts(),
                "stats": self.stats, "findings": [f.to_dict() for f in self.findings]}


@dataclass
class _File:
    """One file read: per example its line, normalised prompt and answer, and its length."""

    role: str
    path: Path
    format: str
    lines: array = field(default_factory=lambda: array("l"))
    prompts: list[str] = field(default_factory=list)
    """Raw prompt text (the classifier reads it); `norm` holds the normalised one."""
    norm: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    lengths: array = field(default_factory=lambda: array("l"))
    problems: list[Problem] = field(default_factory=list)
    name: str = ""
    """How findings name the file: its file name, or its path when two files share a name."""


def audit_data(
    train: str | Path,
    test: str | Path | None = None,
    validation: str | Path | None = None,
    format: str | None = None,
    columns: ColumnMapping | None = None,
    tokenizer: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    labels: bool = True,
    log: Callable[[str], None] | None = None,
) -> AuditReport:
    """Every finding in the training file and, against it, the test and validation files.

    With a tokenizer, lengths are tokens through its chat template; without, characters.
    `labels=False` skips the classifier (the jobs API's quick check).
    """
    require_audit_packages()
    if not 0.5 <= threshold <= 1.0:
        raise UsageError(f"--threshold is a Jaccard similarity between 0.5 and 1.0, got {threshold}")
    log = log or (lambda _msg: None)
    report = AuditReport(threshold=threshold)
    files = []
    given = [(role, check_path(p)) for role, p in (("train", train), ("test", test), ("validation", validation))
             if p is not None]
    shared = len({p.name for _, p in given}) < len(given)
    for role, path in given:
        fmt = resolve_format(path, format)
        if fmt in ("csv", "tsv") and (columns is None or columns.output_column is None):
            raise UsageError(f"{path} is a {fmt.upper()} file: say which columns hold the prompt and the answer "
                             "with --input-column and --output-column")
        log(f"reading {path}")
        f = _read_file(role, path, str(path) if shared else path.name, fmt, columns, tokenizer, report.findings)
        report.files[role] = {"path": str(path), "name": f.name, "format": fmt, "examples": len(f.lines),
                              "unreadable_rows": len(f.problems)}
        files.append(f)
    index = NearIndex(threshold)
    train_file = files[0]
    reps: list[int] = []
    signatures: dict[int, Any] = {}
    for f in files:
        log(f"looking for duplicates in {f.name}")
        found, file_reps, file_signatures = _within_file(f, index if f is train_file else NearIndex(threshold))
        report.findings += found
        if f is train_file:
            reps, signatures = file_reps, file_signatures
    for other in files[1:]:
        log(f"looking for {other.name} rows in {train_file.name}")
        report.findings += _leakage(train_file, reps, signatures, other, threshold)
    report.stats["lengths"] = _length_findings(train_file, tokenizer is not None, report.findings)
    report.findings += _answer_findings(train_file)
    label_counts = _label_counts(train_file)
    report.stats["labels"] = dict(label_counts.most_common()) if label_counts else None
    if label_counts:
        report.findings += _rare_labels(train_file, label_counts, report.stats)
        if labels:
            log(f"cross-validating a text classifier on {len(train_file.lines):,} rows for suspect labels")
            suspects, info = find_suspect_labels(train_file.prompts, train_file.answers)
            report.stats["label_model"] = info
            report.findings += [
                Finding("suspect_label", train_file.name, train_file.lines[s.index],
                        f"labelled {s.given!r}; a classifier trained without this row says {s.suggested!r}",
                        confidence=s.confidence, details={"label": s.given, "suggested_label": s.suggested})
                for s in suspects
            ]
    order = {c: i for i, c in enumerate(CHECKS)}
    report.findings.sort(key=lambda f: (order[f.check], f.file != train_file.name, f.file, f.line))
    return report


# ----------------------------------------------------------------------------- reading


def _parts(ex: Example | PreferenceExample) -> tuple[str, str, list[tuple[str, str]]]:
    """(prompt, answer, [(field, text)]) of an example. The prompt is every non-system
    message before the last assistant answer: a system prompt shared by all rows would
    make every pair look alike."""
    if isinstance(ex, PreferenceExample):
        messages = list(ex.prompt) + list(ex.chosen)
        prompt_msgs, answer = list(ex.prompt), " ".join(m.content for m in ex.chosen)
        fields = [(f"messages[{i}]", m.content) for i, m in enumerate(ex.prompt)]
        fields += [(f"chosen[{i}]", m.content) for i, m in enumerate(ex.chosen)]
        fields += [(f"rejected[{i}]", m.content) for i, m in enumerate(ex.rejected)]
    else:
        messages = list(ex.messages)
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
        prompt_msgs = messages[:last]
        answer = messages[last].content if last < len(messages) else ""
        fields = [(f"messages[{i}]", m.content) for i, m in enumerate(messages)]
    prompt = "\n".join(m.content for m in prompt_msgs if m.role != "system")
    return prompt, answer, fields


class _TokenLengths:
    """Tokens of examples with the chat template, fast: each message's tokens come from one
    batched tokenizer call, and the template's own tokens (role markers, a default system
    prompt) are rendered once per sequence of roles and added. Exact for templates that put
    special tokens between messages (ChatML, Llama 3); examples with tools render whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.overhead: dict[tuple[str, ...], int] = {}

    def __call__(self, examples: list[Example]) -> list[int]:
        contents = [m.content for ex in examples for m in ex.messages]
        # A system prompt repeated on every row is tokenized once.
        distinct = list(dict.fromkeys(contents))
        size = dict(zip(distinct, _token_counts(self.tokenizer, distinct)))
        counts = [size[text] for text in contents]
        out, k = [], 0
        for ex in examples:
            body, k = sum(counts[k:k + len(ex.messages)]), k + len(ex.messages)
            if ex.tools or any(m.tool_calls for m in ex.messages):
                out.append(render_examples(self.tokenizer, [ex])[0].full_length)
                continue
            roles = tuple(m.role for m in ex.messages)
            if roles not in self.overhead:
                self.overhead[roles] = render_examples(self.tokenizer, [ex])[0].full_length - body
            out.append(body + self.overhead[roles])
        return out


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens in each text, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer's batch call (parallel) without transformers' wrapping and
        # without the character offsets, which nothing here reads: about a fifth less CPU.
        return [len(e) for e in fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _read_file(role: str, path: Path, name: str, fmt: str, columns: ColumnMapping | None, tokenizer: Any,
               findings: list[Finding]) -> _File:
    f = _File(role, path, fmt, name=name)
    pending: list[Example] = []
    measure = _TokenLengths(tokenizer) if tokenizer is not None else None

    def flush() -> None:
        if pending and measure is not None:
            f.lengths.extend(measure(pending))
            pending.clear()

    prompt_fields = {"prompt", "instruction", columns.input_column if columns else "text"}
    last_pii: dict[str, str] = {}
    for rec in iter_records(path, fmt, columns):
        f.problems += rec.errors
        # The readers refuse an empty answer (validate reports it as an error); the audit
        # lists them too, as the rows its other checks could not see.
        findings += [Finding("empty_answer", name, p.line, f"{p.message} (the row is skipped in training)",
                             details={"field": p.field})
                     for p in rec.errors if p.code == "empty_content" and p.field not in prompt_fields]
        ex = rec.example
        if ex is None:
            continue
        prompt, answer, fields = _parts(ex)
        f.lines.append(rec.line)
        f.prompts.append(prompt)
        f.norm.append(normalize(prompt))
        f.answers.append(answer.strip())
        f.keys.append(hash(ex.key()))
        for name, text in fields:
            if text == last_pii.get(name):
                continue  # the same text as the row before (a shared system prompt) was checked
            last_pii[name] = text
            for m in find_pii(text):
                findings.append(Finding("pii", name, rec.line, f"{m.kind.replace('_', ' ')} {m.masked()}",
                                        details={"kind": m.kind, "field": name, "span": [m.start, m.end]}))
        if measure is None:
            f.lengths.append(sum(len(t) for _, t in fields))
        else:
            pending += list(ex.sequences()) if isinstance(ex, PreferenceExample) else [ex]
            if len(pending) >= RENDER_CHUNK:
                flush()
    flush()
    if measure is not None and len(f.lengths) != len(f.lines):
        # A preference pair is measured as two sequences: add each pair's two lengths.
        pairs = f.lengths
        f.lengths = array("l", (pairs[2 * i] + pairs[2 * i + 1] for i in range(len(f.lines))))
    return f


# ----------------------------------------------------------------------------- duplicates


def _answers_match(a: str, b: str, threshold: float) -> bool:
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    return bool(na and nb) and jaccard_normalized(na, nb) >= threshold


def _within_file(f: _File, index: NearIndex) -> tuple[list[Finding], list[int], dict[int, Any]]:
    """Exact and near duplicates and conflicting answers inside one file. Each row is
    compared with the rows before it, so the first of a cluster is the one kept."""
    found: list[Finding] = []
    first_key: dict[int, int] = {}
    first_prompt: dict[str, int] = {}
    rep_rows: list[int] = []
    """Index id -> the row whose prompt it holds (one per distinct normalised prompt)."""
    distinct: set[str] = set()
    new_rows = [i for i, norm in enumerate(f.norm) if not (norm in distinct or distinct.add(norm))]
    signatures = {}
    for start, batch in chunked([f.norm[i] for i in new_rows]):
        for row, sig in zip(new_rows[start:start + len(batch)], index.signatures(batch)):
            signatures[row] = sig
    for i in range(len(f.lines)):
        line = f.lines[i]
        if f.keys[i] in first_key:
            j = first_key[f.keys[i]]
            found.append(Finding("exact_duplicate", f.name, line, f"the same example as line {f.lines[j]}",
                                 other_file=f.name, other_line=f.lines[j], similarity=1.0))
            continue
        first_key[f.keys[i]] = i
        j, sim = None, 1.0
        if f.norm[i] in first_prompt:
            j = first_prompt[f.norm[i]]
        else:
            match = index.best_match(f.norm[i], signatures[i])
            if match is not None:
                j, sim = rep_rows[match[0]], match[1]
            first_prompt[f.norm[i]] = i
            rep_rows.append(i)
            index.add(f.norm[i], signatures[i])
        if j is None:
            continue
        sim = round(sim, 3)
        if _answers_match(f.answers[i], f.answers[j], index.threshold):
            how = "differs only in case, punctuation or spacing from" if sim == 1.0 else f"is {sim:.0%} similar to"
            found.append(Finding("near_duplicate", f.name, line, f"{how} line {f.lines[j]}",
                                 other_file=f.name, other_line=f.lines[j], similarity=sim))
        else:
            found.append(Finding(
                "conflicting_answer", f.name, line,
                f"the prompt {'matches' if sim == 1.0 else f'is {sim:.0%} similar to'} line {f.lines[j]}'s, the answer "
                f"differs: {_short(f.answers[i])!r} here, {_short(f.answers[j])!r} there",
                other_file=f.name, other_line=f.lines[j], similarity=sim,
                details={"answer": _short(f.answers[i], 200), "other_answer": _short(f.answers[j], 200)}))
    return found, rep_rows, signatures


def _leakage(train: _File, reps: list[int], signatures: dict[int, Any], other: _File,
             threshold: float) -> list[Finding]:
    """Training rows whose prompt is the same as, or near, a row of the other file. Reported
    at the training row (the copy to drop), with the other file's line."""
    index = NearIndex(threshold)
    by_norm: dict[str, int] = {}
    ids: list[int] = []
    rows = [i for i in range(len(other.lines)) if by_norm.setdefault(other.norm[i], i) == i]
    for start, batch in chunked([other.norm[i] for i in rows]):
        for row, sig in zip(rows[start:start + len(batch)], index.signatures(batch)):
            index.add(other.norm[row], sig)
            ids.append(row)
    found: list[Finding] = []
    matched: dict[str, tuple[int, float]] = {}
    for rep in reps:
        norm = train.norm[rep]
        if norm in by_norm:
            matched[norm] = (by_norm[norm], 1.0)
        else:
            m = index.best_match(norm, signatures[rep])
            if m is not None:
                matched[norm] = (ids[m[0]], round(m[1], 3))
    for i in range(len(train.lines)):
        hit = matched.get(train.norm[i])
        if hit is None:
            continue
        j, sim = hit
        same = _answers_match(train.answers[i], other.answers[j], threshold)
        found.append(Finding(
            "leakage", train.name, train.lines[i],
            f"{'the same prompt as' if sim == 1.0 else f'{sim:.0%} similar to'} line {other.lines[j]} of the "
            f"{other.role} file {other.name}" + ("" if same else " (with a different answer)"),
            other_file=other.name, other_line=other.lines[j], similarity=sim, details={"same_answer": same}))
    return found


# ----------------------------------------------------------------------------- distributions


def _label_counts(f: _File) -> Counter[str] | None:
    """Answers' counts when the answers look like class labels (as `validate` decides)."""
    counts = Counter(f.answers)
    if not counts or len(counts) > MAX_LABELS or len(f.answers) < 2 * len(counts) or len(counts) < 2:
        return None
    return counts


def _rare_labels(f: _File, counts: Counter[str], stats: dict[str, Any]) -> list[Finding]:
    ordered = sorted(counts.values())
    median = ordered[len(ordered) // 2]
    stats["imbalance_ratio"] = round(ordered[-1] / ordered[0], 2)
    limit = max(5, RARE_SHARE * median)
    first_line = {}
    for line, answer in zip(f.lines, f.answers):
        first_line.setdefault(answer, line)
    return [Finding("rare_label", f.name, first_line[label],
                    f"label {label!r} has {n} row(s), the median label {median}",
                    details={"label": label, "rows": n})
            for label, n in counts.items() if n < limit]


def _length_findings(f: _File, tokens: bool, findings: list[Finding]) -> dict[str, Any] | None:
    if not f.lengths:
        return None
    ordered = sorted(f.lengths)
    n = len(ordered)

    def pct(q: float) -> int:
        return int(ordered[min(n - 1, int(q * (n - 1) + 0.5))])

    q1, q3 = pct(0.25), pct(0.75)
    fence = max(q3 + LONG_IQR * (q3 - q1), 2 * pct(0.5))
    unit = "tokens" if tokens else "characters"
    what = "tokens with the chat template" if tokens else "characters in its messages"
    for line, length in zip(f.lines, f.lengths):
        if length > fence:
            findings.append(Finding("long_example", f.name, line, f"{length:,} {what}, the file's median {pct(0.5):,}",
                                    details={"length": int(length)}))
    return {"unit": unit, "min": ordered[0], "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1],
            "long_above": int(fence)}


def _answer_findings(f: _File) -> list[Finding]:
    out = []
    for line, answer in zip(f.lines, f.answers):
        if not answer:
            out.append(Finding("empty_answer", f.name, line, "the answer is empty"))
        elif BOILERPLATE.match(answer):
            out.append(Finding("boilerplate_answer", f.name, line, f"boilerplate answer: {_short(answer)!r}",
                               details={"answer": _short(answer, 200)}))
    return out


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
