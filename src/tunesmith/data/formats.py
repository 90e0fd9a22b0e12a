"""Read a data file in any supported format into Examples (or PreferenceExamples).

Formats, detected per file from the first object (or the extension for CSV/TSV):
- chat: `{"messages": [{"role", "content", "weight"?}], "tools"?}` (OpenAI fine-tuning)
- prompt_completion: `{"prompt", "completion"}` or `{"prompt", "response"}`
- alpaca: `{"instruction", "input"?, "output"}`
- preference: `{"prompt", "chosen", "rejected"}` (TRL) or
  `{"input": {"messages"}, "preferred_completion", "non_preferred_completion"}` (OpenAI DPO)
- csv / tsv: one example per row through a column mapping (--input-column/--output-column)

Every problem is collected with its 1-based line (CSV: row) number; a bad line never
stops the scan. Files are streamed line by line, so memory stays flat on large files.

    python -c "from tunesmith.data.formats import read_data; print(read_data('train.jsonl').format)"
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.example import ROLES, Example, Message, ParseResult, PreferenceExample, Problem
from tunesmith.errors import UsageError

FORMATS = ("chat", "prompt_completion", "alpaca", "preference", "csv", "tsv")


@dataclass(frozen=True)
class ColumnMapping:
    """How a CSV/TSV row becomes a chat example."""

    input_column: str = "text"
    output_column: str | None = None
    """None reads prompts only (for evaluation or distillation inputs)."""
    system: str | None = None


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line_no, text, decode_error) for each non-blank line, streaming.

    Handles a UTF-8 BOM and CRLF endings; a line that is not UTF-8 yields its error.
    """
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield line_no, None, f"byte {exc.start} is not valid UTF-8 ({raw[exc.start:exc.start + 1]!r})"


def detect_format(path: Path) -> str:
    """Guess the format from the extension or the first JSON object in the file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    for _, text, err in iter_lines(path):
        if err is not None:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return format_of(obj)
    return "chat"


def format_of(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "chat"
    if "chosen" in obj or "preferred_completion" in obj:
        return "preference"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj and ("completion" in obj or "response" in obj):
        return "prompt_completion"
    return "chat"


def read_data(
    path: str | Path,
    format: str | None = None,
    columns: ColumnMapping | None = None,
) -> ParseResult:
    """Parse a whole file, collecting every problem; raise only for an unusable path."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file '{path}' does not exist")
    if path.is_dir():
        raise UsageError(f"'{path}' is a directory; give a .jsonl, .csv or .tsv file")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; accepted: {', '.join(FORMATS)}")
    result = ParseResult(format=fmt)
    if fmt in ("csv", "tsv"):
        _read_table(path, fmt, columns or ColumnMapping(), result)
    else:
        _read_jsonl(path, fmt, result)
    if not result.examples and not result.preferences and not result.errors:
        result.errors.append(Problem(0, "", "empty_file", f"'{path}' holds no examples"))
    return result


def _read_jsonl(path: Path, fmt: str, result: ParseResult) -> None:
    for line_no, text, err in iter_lines(path):
        if err is not None:
            result.errors.append(Problem(line_no, "", "invalid_encoding", err + "; save the file as UTF-8"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            result.errors.append(Problem(line_no, "", "invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            result.errors.append(
                Problem(line_no, "", "not_an_object", f"expected a JSON object, got {type(obj).__name__}")
            )
            continue
        line_fmt = fmt
        if fmt == "preference":
            pref = parse_preference(obj, line_no, result.errors)
            if pref is not None:
                result.preferences.append(pref)
            continue
        ex = parse_object(obj, line_fmt, line_no, result.errors, result.warnings)
        if ex is not None:
            result.examples.append(ex)


def parse_object(
    obj: dict[str, Any], fmt: str, line: int, errors: list[Problem], warnings: list[Problem]
) -> Example | None:
    """One JSON object in a supervised format into an Example (None if it has errors)."""
    if fmt == "prompt_completion":
        answer_key = "completion" if "completion" in obj else "response"
        return _pair(obj.get("prompt"), obj.get(answer_key), "prompt", answer_key, line, errors, obj.get("system"))
    if fmt == "alpaca":
        instruction = obj.get("instruction")
        extra = obj.get("input")
        prompt = instruction if not extra else f"{instruction}\n\n{extra}" if isinstance(instruction, str) else instruction
        return _pair(prompt, obj.get("output"), "instruction", "output", line, errors, obj.get("system"))
    return parse_chat(obj, line, errors, warnings)


def _pair(prompt, answer, prompt_field, answer_field, line, errors, system=None) -> Example | None:
    ok = True
    for value, field in ((prompt, prompt_field), (answer, answer_field)):
        if value is None:
            errors.append(Problem(line, field, "missing_content", f"'{field}' is missing"))
            ok = False
        elif not isinstance(value, str):
            errors.append(Problem(line, field, "content_not_string", f"'{field}' must be a string, got {type(value).__name__}"))
            ok = False
        elif not value.strip():
            errors.append(Problem(line, field, "empty_content", f"'{field}' is empty"))
            ok = False
    if not ok:
        return None
    msgs = []
    if isinstance(system, str) and system.strip():
        msgs.append(Message("system", system))
    msgs += [Message("user", prompt), Message("assistant", answer, train=True)]
    return Example(messages=tuple(msgs), line=line)


def parse_messages(raw: Any, field: str, line: int, errors: list[Problem], warnings: list[Problem] | None = None) -> list[Message] | None:
    if not isinstance(raw, list):
        errors.append(Problem(line, field, "messages_not_list", f"'{field}' must be a list of messages, got {type(raw).__name__}"))
        return None
    out: list[Message] = []
    ok = True
    for i, m in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            errors.append(Problem(line, where, "message_not_object", f"{where} must be an object with role and content"))
            ok = False
            continue
        role = m.get("role")
        if role is None:
            errors.append(Problem(line, f"{where}.role", "missing_role", f"{where} has no 'role'"))
            ok = False
            continue
        if role not in ROLES:
            errors.append(
                Problem(line, f"{where}.role", "unknown_role", f"role {role!r} is not one of {', '.join(ROLES)}")
            )
            ok = False
            continue
        for key in m:
            if key not in ("role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call"):
                errors.append(Problem(line, f"{where}.{key}", "unknown_key", f"{where} has unknown key {key!r}"))
                ok = False
        tool_calls = m.get("tool_calls")
        content = m.get("content")
        if content is None and not tool_calls:
            errors.append(Problem(line, f"{where}.content", "missing_content", f"{where} has no 'content'"))
            ok = False
            continue
        if content is not None and not isinstance(content, str):
            errors.append(
                Problem(line, f"{where}.content", "content_not_string", f"{where}.content must be a string, got {type(content).__name__}")
            )
            ok = False
            continue
        if content is not None and not content.strip() and not tool_calls:
            errors.append(Problem(line, f"{where}.content", "empty_content", f"{where}.content is empty"))
            ok = False
            continue
        weight = m.get("weight", 1)
        if "weight" in m and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            errors.append(
                Problem(line, f"{where}.weight", "invalid_weight", f"weight must be 0 or 1 on an assistant message, got {weight!r}")
            )
            ok = False
            continue
        out.append(
            Message(
                role=role,
                content=content or "",
                train=role == "assistant" and weight == 1,
                tool_calls=tool_calls if isinstance(tool_calls, list) else None,
                name=m.get("name") if isinstance(m.get("name"), str) else None,
            )
        )
    return out if ok else None


def parse_chat(obj: dict[str, Any], line: int, errors: list[Problem], warnings: list[Problem]) -> Example | None:
    if "messages" not in obj:
        errors.append(Problem(line, "messages", "missing_messages", "the object has no 'messages' list"))
        return None
    ok = True
    for key in obj:
        if key not in ("messages", "tools", "functions", "parallel_tool_calls", "metadata"):
            errors.append(Problem(line, key, "unknown_key", f"unknown top-level key {key!r} (expected messages, tools)"))
            ok = False
    msgs = parse_messages(obj["messages"], "messages", line, errors, warnings)
    if msgs is None or not ok:
        return None
    if not any(m.role == "assistant" for m in msgs):
        errors.append(Problem(line, "messages", "no_assistant_message", "the conversation has no assistant message to learn from"))
        return None
    tools = obj.get("tools") if isinstance(obj.get("tools"), list) else None
    return Example(messages=tuple(msgs), line=line, tools=tools)


def parse_preference(obj: dict[str, Any], line: int, errors: list[Problem]) -> PreferenceExample | None:
    """TRL's prompt/chosen/rejected (strings or message lists) or OpenAI's DPO lines."""
    if "preferred_completion" in obj or "input" in obj:
        inp = obj.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            errors.append(Problem(line, "input", "missing_messages", "'input' must be an object with 'messages'"))
            return None
        prompt = parse_messages(inp["messages"], "input.messages", line, errors)
        chosen = _answer(obj.get("preferred_completion"), "preferred_completion", line, errors)
        rejected = _answer(obj.get("non_preferred_completion"), "non_preferred_completion", line, errors)
    else:
        raw_prompt = obj.get("prompt")
        if isinstance(raw_prompt, str):
            prompt = [Message("user", raw_prompt)] if raw_prompt.strip() else None
            if prompt is None:
                errors.append(Problem(line, "prompt", "empty_content", "'prompt' is empty"))
        elif raw_prompt is None:
            errors.append(Problem(line, "prompt", "missing_content", "'prompt' is missing"))
            prompt = None
        else:
            prompt = parse_messages(raw_prompt, "prompt", line, errors)
        chosen = _answer(obj.get("chosen"), "chosen", line, errors)
        rejected = _answer(obj.get("rejected"), "rejected", line, errors)
    if prompt is None or chosen is None or rejected is None:
        return None
    return PreferenceExample(prompt=tuple(prompt), chosen=tuple(chosen), rejected=tuple(rejected), line=line)


def _answer(raw: Any, field: str, line: int, errors: list[Problem]) -> list[Message] | None:
    if raw is None:
        errors.append(Problem(line, field, "missing_content", f"'{field}' is missing"))
        return None
    if isinstance(raw, str):
        if not raw.strip():
            errors.append(Problem(line, field, "empty_content", f"'{field}' is empty"))
            return None
        return [Message("assistant", raw, train=True)]
    msgs = parse_messages(raw, field, line, errors)
    if msgs is None:
        return None
    msgs = [Message(m.role, m.content, train=m.role == "assistant", tool_calls=m.tool_calls) for m in msgs]
    if not any(m.role == "assistant" for m in msgs):
        errors.append(Problem(line, field, "no_assistant_message", f"'{field}' holds no assistant message"))
        return None
    return msgs


def _read_table(path: Path, fmt: str, columns: ColumnMapping, result: ParseResult) -> None:
    delimiter = "\t" if fmt == "tsv" else ","
    with open(path, "rb") as fh:
        stream = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="strict", newline="")
        try:
            reader = csv.reader(stream, delimiter=delimiter)
            header = next(reader, None)
        except UnicodeDecodeError as exc:
            result.errors.append(Problem(1, "", "invalid_encoding", f"the header is not valid UTF-8 ({exc.reason})"))
            return
        if header is None:
            return
        wanted = [c for c in (columns.input_column, columns.output_column) if c]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UsageError(
                f"{path}: column(s) {', '.join(repr(c) for c in missing)} not found; the header has "
                f"{', '.join(repr(h) for h in header)}; choose with --input-column and --output-column"
            )
        i_in = header.index(columns.input_column)
        i_out = header.index(columns.output_column) if columns.output_column else None
        row_no = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError as exc:
                result.errors.append(Problem(row_no + 1, "", "invalid_encoding", f"not valid UTF-8 ({exc.reason})"))
                break
            except csv.Error as exc:
                result.errors.append(Problem(reader.line_num, "", "invalid_csv", str(exc)))
                continue
            row_no = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            problems_before = len(result.errors)
            text = row[i_in] if i_in < len(row) else ""
            answer = row[i_out] if i_out is not None and i_out < len(row) else None
            if not text.strip():
                result.errors.append(Problem(row_no, columns.input_column, "empty_content", f"column '{columns.input_column}' is empty"))
            if i_out is not None and not (answer or "").strip():
                result.errors.append(Problem(row_no, columns.output_column or "", "empty_content", f"column '{columns.output_column}' is empty"))
            if len(result.errors) > problems_before:
                continue
            msgs = []
            if columns.system:
                msgs.append(Message("system", columns.system))
            msgs.append(Message("user", text))
            if answer is not None:
                msgs.append(Message("assistant", answer, train=True))
            result.examples.append(Example(messages=tuple(msgs), line=row_no))
