"""Check a data file through the target model's chat template before any compute is spent.

The file is streamed in chunks: each chunk is rendered with `render_examples` (one
batched tokenizer call), and only numbers are kept per example (token counts, a hash for
duplicates, the line), so memory stays flat however large the file is.

    tunesmith validate data/banking77/train.csv --input-column text --output-column category
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tunesmith.data.example import Example, PreferenceExample, Problem
from tunesmith.data.formats import (
    ColumnMapping,
    Record,
    check_path,
    empty_file_problem,
    iter_records,
    resolve_format,
)
from tunesmith.data.render import TemplateError, TokenizedExample, end_of_turn_ids, render_examples
from tunesmith.data.stats import auto_epochs
from tunesmith.errors import UsageError
from tunesmith.models.registry import DEFAULT_MODEL, ModelRef, load_tokenizer, resolve_model, transformers_names
from tunesmith.models.speed import load_speed_entry, machine_busy

MIN_EXAMPLES = 10
DEFAULT_MAX_SEQ_LEN = 2048
MAX_LABELS = 100
"""Answers drawn from at most this many distinct strings count as class labels."""
CHUNK_SIZE = 1024
CHUNK_MAX_CHARS = 200_000
PROBE_TOKENS = 1024
"""Tokens per step of the speed probe: a second or two per step here, enough to batch like training."""


@dataclass
class ValidationReport:
    """What `tunesmith validate` found; `to_dict()` is the `--json` output."""

    path: Path
    format: str
    examples: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "format": self.format,
            "examples": self.examples,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "stats": self.stats,
            "estimate": self.estimate,
        }


def load_tokenizer_quick(ref: ModelRef) -> Any:
    """The model's tokenizer without importing the model classes (seconds saved per run).

    A Hugging Face directory with a `tokenizer.json` loads as a fast tokenizer directly;
    anything else (a GGUF file) goes through the registry's AutoTokenizer path.
    """
    if not ref.is_gguf and (ref.path / "tokenizer.json").is_file():
        (PreTrainedTokenizerFast,) = transformers_names("PreTrainedTokenizerFast")
        return PreTrainedTokenizerFast.from_pretrained(str(ref.path))

    return load_tokenizer(ref)


def validate_data(
    path: str | Path,
    model: str | Path | None = DEFAULT_MODEL,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    validation: str | Path | None = None,
    format: str | None = None,
    columns: ColumnMapping | None = None,
    price_per_million: float | None = None,
    estimate: bool = True,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = None,
    measure_speed: Callable[..., float] | None = None,
) -> ValidationReport:
    """Every problem in the file (and the validation file), stats, and a measured estimate.

    The estimate's speed comes from the speed cache (`tunesmith.models.speed`). Validation
    itself never trains: `measure_speed` (the CLI passes `train.speed.measure_train_tokens_per_s`)
    measures a shape not cached yet; without it (the server) the estimate says none is measured.

    Raises UsageError only for what stops reading at all (missing path, unknown format or
    column, model not found); everything about the data itself lands in the report.
    """
    path = check_path(path)
    validation = check_path(validation) if validation is not None else None
    if max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be a positive number of tokens, got {max_seq_len}")
    fmt = resolve_format(path, format)
    if fmt in ("csv", "tsv") and (columns is None or columns.output_column is None):
        raise UsageError(
            f"{path} is a {fmt.upper()} file: say which columns hold the prompt and the answer with "
            "--input-column and --output-column (e.g. --input-column text --output-column category)"
        )
    ref = resolve_model(model)
    if tokenizer is None:
        tokenizer = load_tokenizer_quick(ref)
    scan = _Scan(tokenizer, max_seq_len)
    scan.check_tokenizer()
    for chunk in _chunks(iter_records(path, fmt, columns), CHUNK_SIZE):
        scan.add_chunk(chunk)
    report = ValidationReport(path=path, format=fmt, examples=scan.n_examples)
    scan.finish(path)
    if validation is not None:
        _check_overlap(scan, validation, format, columns)
    report.errors = sorted(scan.errors, key=lambda p: p.line)
    report.warnings = sorted(scan.warnings, key=lambda p: p.line)
    report.stats = scan.stats()
    if estimate and scan.n_examples:
        report.estimate = build_estimate(ref, report.stats, price_per_million, log, measure_speed)
    return report


def _chunks(records: Iterable[Record], size: int, max_chars: int = CHUNK_MAX_CHARS) -> Iterable[list[Record]]:
    """Records in groups of `size`, or fewer when their text is long: token lists of a
    chunk are Python lists of ints, so the chunk's characters bound validate's memory."""
    chunk: list[Record] = []
    chars = 0
    for rec in records:
        chunk.append(rec)
        chars += _chars(rec.example)
        if len(chunk) >= size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _chars(ex: Example | PreferenceExample | None) -> int:
    if ex is None:
        return 0
    messages = ex.messages if isinstance(ex, Example) else ex.prompt + ex.chosen + ex.rejected
    return sum(len(m.content) for m in messages)


def _example_hash(ex: Example | PreferenceExample) -> int:
    return hash(ex.key())


class _Scan:
    """Running state of one pass over a file: problems plus compact per-example numbers."""

    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.n_examples = 0
        self.n_records = 0
        self.lengths = array("l")
        self.trained = array("l")
        self.hashes = array("q")
        self.lines = array("l")
        self.no_system_lines = array("l")
        self.n_with_system = 0
        self.n_truncated = 0
        self.kept_tokens = 0
        """Tokens after truncation: what one epoch of training processes."""
        self.labels: Counter[str] | None = Counter()

    def check_tokenizer(self) -> None:
        # A pad token equal to the end-of-turn token is the classic way the end token ends up
        # masked as padding, so the model never learns to stop.
        pad = self.tokenizer.pad_token_id
        if pad is not None and pad in end_of_turn_ids(self.tokenizer):
            self.errors.append(
                Problem(0, "tokenizer.pad_token", "eos_not_trained",
                        f"the tokenizer's pad token {self.tokenizer.pad_token!r} is also the token that ends an "
                        "assistant turn, so masking padding masks the end of every answer and the model never "
                        "learns to stop; give the model a distinct pad token (tunesmith models pull does for "
                        "registry models)")
            )

    def add_chunk(self, chunk: list[Record]) -> None:
        sequences: list[Example] = []
        owners: list[tuple[Record, str]] = []
        for rec in chunk:
            self.n_records += 1
            self.errors += rec.errors
            self.warnings += rec.warnings
            if isinstance(rec.example, PreferenceExample):
                sequences += rec.example.sequences()
                owners += [(rec, "chosen"), (rec, "rejected")]
            elif rec.example is not None:
                sequences.append(rec.example)
                owners.append((rec, ""))
        rendered = self._render(sequences)
        # A preference pair is two sequences: it counts only if both render cleanly.
        by_line: dict[int, list[TokenizedExample] | None] = {}
        for (rec, part), ex, te in zip(owners, sequences, rendered):
            ok = te is not None and self._check_rendered(ex, te, part)
            kept = by_line.setdefault(rec.line, [])
            if kept is not None:
                by_line[rec.line] = kept + [te] if ok else None
        for rec, _ in owners:
            tes = by_line.pop(rec.line, None)
            if tes:
                self._count(rec.example, tes)

    def _render(self, sequences: list[Example]) -> list[TokenizedExample | None]:
        try:
            return list(render_examples(self.tokenizer, sequences, self.max_seq_len))
        except TemplateError:
            pass
        # One example broke the template: render one by one to find which.
        out: list[TokenizedExample | None] = []
        for ex in sequences:
            try:
                out.append(render_examples(self.tokenizer, [ex], self.max_seq_len)[0])
            except TemplateError as exc:
                self.errors.append(Problem(ex.line, "messages", "template_error", str(exc.__cause__ or exc)))
                out.append(None)
        return out

    def _check_rendered(self, ex: Example, te: TokenizedExample, part: str) -> bool:
        where = part or "messages"
        line = ex.line
        if te.truncated:
            self.n_truncated += 1
            self.warnings.append(
                Problem(line, where, "too_long",
                        f"{te.full_length} tokens with the model's chat template, over --max-seq-len "
                        f"{self.max_seq_len}: training keeps the first {self.max_seq_len} tokens and drops the "
                        f"last {te.full_length - self.max_seq_len}")
            )
        if te.n_trained == 0:
            self.errors.append(
                Problem(line, where, "no_trainable_tokens",
                        f"after truncation to {self.max_seq_len} tokens no trained (assistant) token is left; "
                        "shorten the prompt or raise --max-seq-len")
            )
            return False
        if te.assistant_truncated:
            self.warnings.append(
                Problem(line, where, "assistant_truncated",
                        f"truncation to {self.max_seq_len} tokens cuts a trained assistant turn, so the model "
                        "learns an answer without its end; raise --max-seq-len or shorten the example")
            )
        if not te.eos_trained:
            self.errors.append(
                Problem(line, where, "eos_not_trained",
                        "the chat template closes an assistant turn without a special end-of-turn token, so "
                        "the model cannot learn where an answer stops; use a model whose template ends turns "
                        "with a special token")
            )
            return False
        if ex.tools or any(m.tool_calls for m in ex.messages):
            self._check_tools(ex, te)
        return True

    def _check_tools(self, ex: Example, te: TokenizedExample) -> None:
        names = set()
        for tool in ex.tools or []:
            fn = tool.get("function", tool) if isinstance(tool, dict) else {}
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
        for m in ex.messages:
            for call in m.tool_calls or []:
                fn = call.get("function", call)
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    names.add(fn["name"])
        text = self.tokenizer.decode(te.input_ids)
        missing = sorted(n for n in names if n not in text)
        if missing or not names:
            self.warnings.append(
                Problem(ex.line, "tools", "tools_not_rendered",
                        "the model's chat template does not render tools or tool calls "
                        f"({', '.join(missing) or 'no function names found'} missing from the rendered text), "
                        "so the model will not see them; use a model whose template supports tools")
            )

    def _count(self, ex: Example | PreferenceExample | None, tes: list[TokenizedExample]) -> None:
        """Numbers for one valid example (its sequences were just rendered and checked)."""
        if ex is None:
            return
        self.n_examples += 1
        self.lengths.append(sum(te.full_length for te in tes))
        self.kept_tokens += sum(len(te) for te in tes)
        self.trained.append(sum(te.n_trained for te in tes))
        self.hashes.append(_example_hash(ex))
        self.lines.append(ex.line)
        messages = ex.messages if isinstance(ex, Example) else ex.prompt
        if any(m.role == "system" for m in messages):
            self.n_with_system += 1
        else:
            self.no_system_lines.append(ex.line)
        if self.labels is not None:
            answers = ex.trained_messages if isinstance(ex, Example) else list(ex.chosen)
            if answers and answers[-1].tool_calls:  # tool calls are not class labels
                self.labels = None
                return
            self.labels[answers[-1].content.strip() if answers else ""] += 1
            if len(self.labels) > MAX_LABELS:
                self.labels = None

    def finish(self, path: Path) -> None:
        """File-level checks once every record is seen."""
        if self.n_records == 0:
            self.errors.append(empty_file_problem(path))
        elif self.n_examples < MIN_EXAMPLES:
            self.errors.append(
                Problem(0, "", "too_few_examples",
                        f"only {self.n_examples} valid example(s); fine-tuning needs at least {MIN_EXAMPLES} "
                        "(50 to 100 good ones is a sensible start)")
            )
        self._duplicates()
        if self.n_with_system and self.n_with_system * 2 >= self.n_examples:
            for line in self.no_system_lines:
                self.warnings.append(
                    Problem(line, "messages", "missing_system_message",
                            f"no system message, while {self.n_with_system} of {self.n_examples} examples have "
                            "one; the model will see a different prompt here (add the same system message)")
                )

    def _duplicates(self) -> None:
        first: dict[int, int] = {}
        # Sorting by hash would need all pairs in memory twice; a dict of the hashes seen
        # once holds 1 entry per distinct example, fine for millions of lines.
        for h, line in zip(self.hashes, self.lines):
            seen = first.setdefault(h, line)
            if seen != line:
                self.warnings.append(
                    Problem(line, "", "duplicate_example",
                            f"the same example as line {seen}; duplicates weigh that example double in training")
                )

    def stats(self) -> dict[str, Any]:
        labels = None
        if self.labels is not None and self.labels and self.n_examples >= 2 * len(self.labels):
            labels = dict(self.labels.most_common())
        return {
            "examples": self.n_examples,
            "max_seq_len": self.max_seq_len,
            "tokens_per_example": _summary(self.lengths),
            "trained_tokens_per_example": _summary(self.trained),
            "tokens_per_epoch": self.kept_tokens,
            "trained_tokens_per_epoch": int(sum(self.trained)),
            "truncated_examples": self.n_truncated,
            "labels": labels,
        }


def _summary(values: array) -> dict[str, int] | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def pct(q: float) -> int:
        return int(ordered[min(n - 1, int(q * (n - 1) + 0.5))])

    return {"min": int(ordered[0]), "p50": pct(0.5), "p95": pct(0.95), "max": int(ordered[-1])}


def _check_overlap(scan: _Scan, validation: Path, format: str | None, columns: ColumnMapping | None) -> None:
    """Warn on every training example that is also in the validation file; report its errors."""
    fmt = resolve_format(validation, format if format not in ("csv", "tsv") else None)
    seen: dict[int, int] = {}
    n = 0
    for rec in iter_records(validation, fmt, columns):
        for p in rec.errors:
            scan.errors.append(Problem(p.line, p.field, p.code, f"{validation.name}: {p.message}"))
        if rec.example is not None:
            n += 1
            seen.setdefault(_example_hash(rec.example), rec.line)
    if n == 0 and not any(p.message.startswith(validation.name) for p in scan.errors):
        scan.errors.append(Problem(0, "", "empty_file", f"{validation.name}: the validation file holds no examples"))
    for h, line in zip(scan.hashes, scan.lines):
        if h in seen:
            scan.warnings.append(
                Problem(line, "", "validation_overlap",
                        f"the same example is at line {seen[h]} of the validation file {validation.name}, so "
                        "validation loss there measures memory, not generalisation; remove it from one file")
            )


def probe_shape(stats: dict[str, Any]) -> tuple[int, int]:
    """(tokens per example, examples per step) for the speed probe: the median example
    length rounded up to a power of two (32 to max_seq_len; few shapes, so few
    measurements to cache), and as many of them as fit PROBE_TOKENS, at most the default
    batch of 16. Attention and packing cost depend on the example length, so a probe of
    the data's own length times what training will run."""
    p50 = (stats.get("tokens_per_example") or {}).get("p50") or 256
    seq_len = min(max(32, 1 << (int(p50) - 1).bit_length()), max(32, stats.get("max_seq_len") or 2048))
    return seq_len, max(1, min(16, PROBE_TOKENS // seq_len))


def build_estimate(
    ref: ModelRef, stats: dict[str, Any], price_per_million: float | None, log: Callable[[str], None] | None = None,
    measure_speed: Callable[..., float] | None = None,
) -> dict[str, Any]:
    """Epochs tunesmith would pick, tokens in total, measured time here, hosted cost."""
    epochs = auto_epochs(stats["examples"])
    tokens_total = stats["tokens_per_epoch"] * epochs
    seq_len, batch_size = probe_shape(stats)
    entry = load_speed_entry(ref, seq_len=seq_len, batch_size=batch_size)
    if measure_speed is not None and (entry is None or (entry.get("busy") and not machine_busy())):
        measure_speed(ref, seq_len=seq_len, batch_size=batch_size, log=log)
        entry = load_speed_entry(ref, seq_len=seq_len, batch_size=batch_size)
    tokens_per_s = float(entry["tokens_per_s"]) if entry else None
    return {
        "epochs": epochs,
        "tokens_total": tokens_total,
        "trained_tokens_total": stats["trained_tokens_per_epoch"] * epochs,
        "train_tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "speed_precision": entry.get("precision") if entry else None,
        "speed_measured_busy": bool(entry and entry.get("busy")),
        "time_s": round(tokens_total / tokens_per_s, 1) if tokens_per_s else None,
        "price_per_million": price_per_million,
        # Hosted APIs bill every token of the file once per epoch, not only the trained ones.
        "hosted_cost": round(tokens_total * price_per_million / 1e6, 2) if price_per_million is not None else None,
    }


def report_json(report: ValidationReport) -> str:
    return json.dumps(report.to_dict(), ensure_ascii=False)


SHOWN_PER_CODE = 20


def print_report(report: ValidationReport, console: Any) -> None:
    """The readable report: problems grouped by code (first 20 each), stats, estimate."""
    from rich.table import Table

    verdict = "[green]valid[/green]" if report.ok else f"[red]invalid: {len(report.errors)} error(s)[/red]"
    pairs = report.format == "preference"
    console.print(f"[bold]{report.path}[/bold]: {report.format}, {report.examples:,} usable "
                  f"{'preference pairs (for tunesmith train --method dpo)' if pairs else 'examples'}, {verdict}"
                  + (f", {len(report.warnings)} warning(s)" if report.warnings else ""))
    for kind, problems, style in (("error", report.errors, "red"), ("warning", report.warnings, "yellow")):
        by_code: dict[str, list[Problem]] = {}
        for p in problems:
            by_code.setdefault(p.code, []).append(p)
        for code, group in by_code.items():
            console.print(f"\n[{style}]{kind} {code}[/{style}] ({len(group)})")
            for p in group[:SHOWN_PER_CODE]:
                where = f"line {p.line}" if p.line else "file"
                console.print(f"  {where}" + (f" {p.field}" if p.field else "") + f": {p.message}", markup=False, highlight=False)
            if len(group) > SHOWN_PER_CODE:
                console.print(f"  ... and {len(group) - SHOWN_PER_CODE} more (all of them with --json)")
    console.print("\n" + audit_hint(report), markup=False, highlight=False)
    s = report.stats
    if s.get("tokens_per_example"):
        table = Table("tokens (chat template)", "min", "p50", "p95", "max", "per epoch", box=None, pad_edge=False)
        for label, key, total in (("per example", "tokens_per_example", "tokens_per_epoch"),
                                  ("trained per example", "trained_tokens_per_example", "trained_tokens_per_epoch")):
            d = s[key]
            table.add_row(label, *(f"{d[k]:,}" for k in ("min", "p50", "p95", "max")), f"{s[total]:,}")
        console.print()
        console.print(table)
        if pairs:
            console.print("a pair is two sequences, the prompt with the chosen and with the rejected answer: "
                          "its tokens count both, its trained tokens both answers")
        if s["truncated_examples"]:
            console.print(f"{s['truncated_examples']:,} example(s) longer than --max-seq-len {s['max_seq_len']}")
    if s.get("labels"):
        labels = s["labels"]
        top = ", ".join(f"{k} {v}" for k, v in list(labels.items())[:8])
        console.print(f"\nanswers look like class labels: {len(labels)} distinct; most common: {top}"
                      + (" ..." if len(labels) > 8 else ""), markup=False, highlight=False)
        least = list(labels.items())[-1]
        console.print(f"least common: {least[0]} {least[1]}", markup=False, highlight=False)
    e = report.estimate
    if e:
        speed = (f"at {e['train_tokens_per_s']:,} tokens/s measured here (LoRA r=16) about {_duration(e['time_s'])}"
                 if e.get("train_tokens_per_s") else
                 "no training speed measured on this machine yet for this model and shape "
                 "(`tunesmith validate` measures it once)")
        console.print(
            f"\nestimate: {e['epochs']} epoch(s) (auto), {e['tokens_total']:,} tokens processed, "
            f"{e['trained_tokens_total']:,} trained; {speed}"
        )
        if pairs:
            console.print("  DPO adds one forward pass over the data for the reference model, about a third of an "
                          "epoch's time")
        if e.get("speed_measured_busy"):
            console.print("  (the speed was measured while other processes kept the CPUs busy; "
                          "it is measured again once the machine is idle)")
        if e.get("hosted_cost") is not None:
            console.print(f"hosted cost at ${e['price_per_million']}/M tokens: ${e['hosted_cost']:,.2f}")


def audit_hint(report: ValidationReport) -> str:
    """The one line on duplicates and leakage, naming the command that looks further."""
    dups = sum(p.code == "duplicate_example" for p in report.warnings)
    overlap = sum(p.code == "validation_overlap" for p in report.warnings)
    found = f"{dups} exact duplicate(s), {overlap} example(s) also in the validation file"
    return (f"{found}; `tunesmith audit {report.path}` also finds near duplicates, test/validation leakage, "
            "conflicting and suspect labels and personal data")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
