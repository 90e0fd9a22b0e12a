"""Show the first examples exactly as the model sees them, with the loss mask visible.

Trained tokens are highlighted and masked ones dim on a terminal; when stdout is not a
terminal, trained text is wrapped in `[[...]]`. Per example, a table gives each role's
tokens and how many of them are trained: the label audit that catches masking bugs.

    tunesmith inspect examples/chat.jsonl -n 2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.example import Example, PreferenceExample, Problem
from tunesmith.data.formats import ColumnMapping, check_path, iter_records, resolve_format
from tunesmith.data.render import IGNORE_INDEX, TokenizedExample, render_examples, render_text
from tunesmith.data.validate import load_tokenizer_quick
from tunesmith.models.registry import DEFAULT_MODEL, resolve_model

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
_EXACT_OFFSETS_MAX_TOKENS = 4096


@dataclass
class InspectedExample:
    line: int
    tokenized: TokenizedExample
    runs: list[tuple[str, bool]]
    """The decoded text cut where the loss mask changes: (text, trained)."""
    roles: dict[str, tuple[int, int]]
    """role -> (tokens, trained tokens); empty when tokens cannot be mapped to messages."""
    part: str = ""
    """For a preference pair: "chosen" or "rejected"."""


def inspect_data(
    path: str | Path,
    model: str | Path | None = DEFAULT_MODEL,
    n: int = 3,
    max_seq_len: int | None = None,
    format: str | None = None,
    columns: ColumnMapping | None = None,
    tokenizer: Any = None,
) -> tuple[list[InspectedExample], list[Problem]]:
    """The first n usable examples, rendered; plus the problems of the lines skipped on the way."""

    path = check_path(path)
    fmt = resolve_format(path, format)
    if tokenizer is None:
        tokenizer = load_tokenizer_quick(resolve_model(model))
    examples: list[Example] = []
    problems: list[Problem] = []
    parts: list[str] = []
    shown = 0
    for rec in iter_records(path, fmt, columns):
        problems += rec.errors
        if isinstance(rec.example, PreferenceExample):
            # A preference pair is trained as two sequences: show both.
            pref = rec.example
            examples += pref.sequences()
            parts += ["chosen", "rejected"]
        elif rec.example is not None:
            examples.append(rec.example)
            parts.append("")
        shown += rec.example is not None
        if shown >= n:
            break
    rendered = render_examples(tokenizer, examples, max_seq_len)
    return [_inspect_one(tokenizer, ex, te, part) for ex, te, part in zip(examples, rendered, parts)], problems


def _inspect_one(tokenizer: Any, ex: Example, te: TokenizedExample, part: str = "") -> InspectedExample:
    runs: list[tuple[str, bool]] = []
    start = 0
    flags = [lab != IGNORE_INDEX for lab in te.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((tokenizer.decode(te.input_ids[start:i]), flags[start]))
            start = i
    return InspectedExample(ex.line, te, runs, _role_counts(tokenizer, ex, te, flags), part)


def _role_counts(tokenizer: Any, ex: Example, te: TokenizedExample, flags: list[bool]) -> dict[str, tuple[int, int]]:
    """Tokens and trained tokens per role, by where each token falls in the template's text."""
    ends = [len(render_text(tokenizer, ex.messages[: i + 1], ex.tools)) for i in range(len(ex.messages))]
    starts = _token_char_starts(tokenizer, te.input_ids)
    full = render_text(tokenizer, ex.messages, ex.tools)
    decoded = tokenizer.decode(te.input_ids)
    bos = tokenizer.bos_token or ""
    if full.startswith(decoded):
        shift = 0
    elif bos and decoded.startswith(bos) and full.startswith(decoded[len(bos):]):
        shift = len(bos)  # a BOS the renderer put in front of the template's text
    else:
        return {}  # the tokenizer does not decode back to the text: no honest mapping
    counts: dict[str, list[int]] = {}
    for tok_start, trained in zip(starts, flags):
        at = tok_start - shift
        i = next((k for k, end in enumerate(ends) if at < end), len(ends) - 1)
        role = ex.messages[i].role
        c = counts.setdefault(role, [0, 0])
        c[0] += 1
        c[1] += int(trained)
    return {role: (c[0], c[1]) for role, c in counts.items()}


def _token_char_starts(tokenizer: Any, ids: list[int]) -> list[int]:
    if len(ids) <= _EXACT_OFFSETS_MAX_TOKENS:
        # Decoding growing prefixes is exact even when a character spans two byte tokens.
        return [len(tokenizer.decode(ids[:j])) for j in range(len(ids))]
    starts, at = [], 0
    for t in ids:
        starts.append(at)
        at += len(tokenizer.decode([t]))
    return starts


def print_inspection(items: list[InspectedExample], problems: list[Problem], console: Any, plain: bool) -> None:
    """Rich on a terminal; with plain=True, trained text in [[...]] and no styles."""
    from rich.table import Table
    from rich.text import Text

    for p in problems:
        console.print(f"skipped line {p.line}: {p.code} at {p.field or '-'}: {p.message}", markup=False, highlight=False)
    for item in items:
        te = item.tokenized
        share = te.n_trained / len(te) if len(te) else 0.0
        head = f"line {item.line}{f' ({item.part})' if item.part else ''}: {len(te)} tokens, {te.n_trained} trained ({share:.0%})"
        if te.truncated:
            head += f", truncated from {te.full_length}"
        console.rule(head) if not plain else console.print(f"--- {head} ---", markup=False, highlight=False)
        text = Text()
        for chunk, trained in item.runs:
            if plain:
                text.append(f"{TRAINED_OPEN}{chunk}{TRAINED_CLOSE}" if trained else chunk)
            else:
                text.append(chunk, style="bold green" if trained else "dim")
        console.print(text, highlight=False)
        if item.roles:
            table = Table("role", "tokens", "trained", "share trained", box=None, pad_edge=False)
            for role, (n, k) in item.roles.items():
                table.add_row(role, str(n), str(k), f"{k / n:.0%}" if n else "-")
            console.print(table)
    if plain:
        console.print(f"(trained tokens are shown between {TRAINED_OPEN} and {TRAINED_CLOSE})", markup=False, highlight=False)
