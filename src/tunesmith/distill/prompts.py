"""Read the prompts to distil: the training formats with their answers ignored, or plain text.

- chat JSONL: `{"messages": [...]}`; the conversation up to its last user message is the
  prompt (assistant turns after it are missing or ignored; earlier ones stay as context)
- `{"prompt": "..."}` (a `completion`/`response` beside it is ignored) or
  `{"instruction", "input"?}` (alpaca; `output` ignored)
- CSV/TSV: the `--input-column` of every row
- plain text (.txt, or any file whose first line is not a JSON object): one prompt a line

Every problem is collected with its line before one DataError is raised.

    python -c "from tunesmith.distill.prompts import load_prompts; print(len(load_prompts('prompts.txt')))"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.example import Message, Problem
from tunesmith.data.formats import ColumnMapping, check_path, iter_lines, iter_records, load_json_line, parse_messages
from tunesmith.errors import DataError, UsageError

PROMPT_FORMATS = ("jsonl", "chat", "prompt_completion", "alpaca", "csv", "tsv", "text")
"""chat, prompt_completion and alpaca are all read as jsonl (each line's keys decide)."""


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]
    line: int


def detect_prompt_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".txt":
        return "text"
    for _, text, _ in iter_lines(path):
        if text is not None and text.lstrip().startswith("{"):
            return "jsonl"
        return "jsonl" if suffix in (".jsonl", ".json") else "text"
    return "text"


def load_prompts(
    path: str | Path, format: str | None = None, input_column: str = "text", system: str | None = None
) -> list[Prompt]:
    """Every prompt in the file, in order; `system` replaces any system message they have."""
    path = check_path(path)
    if format is not None and format not in PROMPT_FORMATS:
        raise UsageError(f"unknown --format '{format}' for prompts; accepted: {', '.join(PROMPT_FORMATS)}")
    fmt = format or detect_prompt_format(path)
    fmt = "jsonl" if fmt in ("chat", "prompt_completion", "alpaca") else fmt
    errors: list[Problem] = []
    prompts: list[Prompt] = []
    if fmt in ("csv", "tsv"):
        for rec in iter_records(path, fmt, ColumnMapping(input_column=input_column, output_column=None)):
            errors += rec.errors
            if rec.example is not None:
                prompts.append(Prompt(rec.example.messages, rec.line))
    elif fmt == "text":
        for line_no, text, err in iter_lines(path):
            if err is not None:
                errors.append(Problem(line_no, "", "invalid_encoding", err + "; save the file as UTF-8"))
            else:
                prompts.append(Prompt((Message("user", text),), line_no))
    else:
        for line_no, text, err in iter_lines(path):
            msgs = _json_prompt(line_no, text, err, errors)
            if msgs is not None:
                prompts.append(Prompt(tuple(msgs), line_no))
    if errors:
        shown = "; ".join(f"line {p.line}: {p.message}" for p in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DataError(f"{path}: {len(errors)} problem(s) in the prompts: {shown}{more}")
    if not prompts:
        raise DataError(f"{path} holds no prompts (it is empty or has only blank lines)")
    if system is not None:
        prompts = [Prompt((Message("system", system),) + tuple(m for m in p.messages if m.role != "system"), p.line)
                   for p in prompts]
    return prompts


def _json_prompt(line: int, text: str | None, err: str | None, errors: list[Problem]) -> list[Message] | None:
    if err is not None:
        errors.append(Problem(line, "", "invalid_encoding", err + "; save the file as UTF-8"))
        return None
    try:
        obj: Any = load_json_line(text or "")
    except json.JSONDecodeError as exc:
        errors.append(Problem(line, "", "invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}"))
        return None
    if not isinstance(obj, dict):
        errors.append(Problem(line, "", "not_an_object", "expected a JSON object"))
        return None
    if "messages" in obj:
        msgs = parse_messages(obj["messages"], "messages", line, errors)
        if msgs is None:
            return None
        users = [i for i, m in enumerate(msgs) if m.role == "user"]
        if not users:
            errors.append(Problem(line, "messages", "no_user_message", "the conversation has no user message to ask"))
            return None
        return msgs[: users[-1] + 1]
    if "prompt" in obj or "instruction" in obj:
        key = "prompt" if "prompt" in obj else "instruction"
        value = obj[key]
        if isinstance(value, list):  # TRL's conversational prompt
            msgs = parse_messages(value, key, line, errors)
            return msgs if msgs is not None and any(m.role == "user" for m in msgs) else None
        if not isinstance(value, str) or not value.strip():
            errors.append(Problem(line, key, "empty_content", f"'{key}' must be a non-empty string"))
            return None
        extra = obj.get("input") if key == "instruction" else None
        content = f"{value}\n\n{extra}" if isinstance(extra, str) and extra.strip() else value
        msgs = [Message("system", obj["system"])] if isinstance(obj.get("system"), str) and obj["system"] else []
        return msgs + [Message("user", content)]
    errors.append(Problem(line, "", "missing_prompt",
                          "the object has no 'messages', 'prompt' or 'instruction' to use as the prompt"))
    return None
