"""Read a data file in any supported format into Examples (or PreferenceExamples).

Formats, detected per file from the first object (or the extension for CSV/TSV):
- chat: `{"messages": [{"role", "content", "weight"?}], "tools"?}` (OpenAI fine-tuning)
- prompt_completion: `{"prompt", "completion"}` or `{"prompt", "response"}`
- alpaca: `{"instruction", "input"?, "output"}`
- preference: `{"prompt", "chosen", "rejected"}` (TRL, strings or message lists) or
  `{"input": {"messages"}, "preferred_output", "non_preferred_output"}` (OpenAI DPO;
  `preferred_completion`/`non_preferred_completion` are accepted as the same thing)
- csv / tsv: one example per row through a column mapping (--input-column/--output-column)

Every problem is collected with its 1-based line (CSV: the line the row starts on, the
header being line 1); a bad line never stops the scan. Files are streamed record by
record (`iter_records`), so memory stays flat on large files; `read_data` collects them.

    python -c "from tunesmith.data.formats import read_data; print(read_data('examples/chat.jsonl').format)"
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.example import (
    ROLES,
    ColumnMapping,
    Example,
    Message,
    ParseResult,
    PreferenceExample,
    Problem,
    Record,
)
from tunesmith.data.tables import table_records
from tunesmith.errors import UsageError

FORMATS = ("chat", "prompt_completion", "alpaca", "preference", "csv", "tsv")

# Keys each format accepts; anything else is `unknown_key` (a misspelling would otherwise
# drop data silently). `id` and `metadata` are bookkeeping that many datasets carry.
_BOOKKEEPING = ("id", "metadata")
CHAT_KEYS = ("messages", "tools", "functions", "parallel_tool_calls", *_BOOKKEEPING)
MESSAGE_KEYS = ("role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call")
PAIR_KEYS = ("prompt", "completion", "response", "system", *_BOOKKEEPING)
ALPACA_KEYS = ("instruction", "input", "output", "system", *_BOOKKEEPING)
TRL_PREFERENCE_KEYS = ("prompt", "chosen", "rejected", *_BOOKKEEPING)
DPO_KEYS = (
    "input", "preferred_output", "non_preferred_output",
    "preferred_completion", "non_preferred_completion", *_BOOKKEEPING,
)
DPO_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")


# ----------------------------------------------------------------------------- lines


MAX_LINE_BYTES = 64 * 1024 * 1024
"""Longest line read: far above any example that fits a context, and a one-line file of
gigabytes is refused line by line instead of being read whole into memory."""
LINE_TOO_LONG = f"the line is longer than {MAX_LINE_BYTES:,} bytes; one example per line, each far shorter"


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line_no, text, error) for each non-blank line, streaming, never holding more
    than MAX_LINE_BYTES of one line.

    Handles a UTF-8 BOM and CRLF endings; a line that is not UTF-8, or longer than
    MAX_LINE_BYTES (LINE_TOO_LONG), yields its error.
    """
    with open(path, "rb") as fh:
        line_no = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := fh.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass  # the rest of the line, read and dropped
                yield line_no, None, LINE_TOO_LONG
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield line_no, None, f"byte {exc.start + 1} of the line is not valid UTF-8 ({raw[exc.start:exc.start + 1]!r})"


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
                              r"|\\u[dD][c-fC-F][0-9a-fA-F]{2}")
"""A UTF-16 surrogate written as a JSON escape: a high one with its low one (a character
such as an emoji), or one alone."""


def load_json_line(text: str) -> Any:
    """json.loads for one line, with every way it can fail as a json.JSONDecodeError: numbers
    of thousands of digits and nesting deeper than Python's recursion raise others, and a
    lone surrogate escape ("\\ud800") is refused here: json.loads takes it, but no UTF-8 text
    holds it, and the tokenizer raised a TypeError on it (a traceback from `tunesmith
    validate`, a 500 from the files API's validation, a job failed as an internal error)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer over Python's 4,300-digit limit
        raise json.JSONDecodeError(str(exc).split(";")[0], text, 0) from None
    if "\\u" in text and SURROGATE_ESCAPE.search(text):  # only such lines can hold one
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            lone = next((m for m in SURROGATE_ESCAPE.finditer(text) if len(m.group()) == 6), None)
            shown = lone.group() if lone else "a \\uXXXX escape"
            raise json.JSONDecodeError(f"{shown} is half of a UTF-16 pair, alone, not a character (write the "
                                       "character itself, or both halves of its escape)", text,
                                       lone.start() if lone else 0) from None
        except RecursionError:  # json.dumps recurses as deep as json.loads did
            raise json.JSONDecodeError("nested too deeply", text, 0) from None
    return obj


def check_path(path: str | Path) -> Path:
    """The path as a Path, or a UsageError saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file '{path}' does not exist")
    if path.is_dir():
        raise UsageError(f"'{path}' is a directory; give a .jsonl, .csv or .tsv file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read data file '{path}': {exc.strerror}") from exc
    return path


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
            obj = load_json_line(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return format_of(obj)
    return "chat"


def format_of(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "chat"
    if "chosen" in obj or "preferred_output" in obj or "preferred_completion" in obj:
        return "preference"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj and ("completion" in obj or "response" in obj):
        return "prompt_completion"
    return "chat"


def resolve_format(path: Path, format: str | None) -> str:
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; accepted: {', '.join(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------- reading


def iter_records(path: str | Path, fmt: str, columns: ColumnMapping | None = None) -> Iterator[Record]:
    """Stream the file's records in order; raises only for an unusable path or mapping."""
    path = check_path(path)
    if fmt in ("csv", "tsv"):
        yield from table_records(path, fmt, columns or ColumnMapping())
    else:
        yield from _jsonl_records(path, fmt)


def read_data(
    path: str | Path,
    format: str | None = None,
    columns: ColumnMapping | None = None,
) -> ParseResult:
    """Parse a whole file, collecting every problem; raise only for an unusable path."""
    path = check_path(path)
    fmt = resolve_format(path, format)
    result = ParseResult(format=fmt)
    for rec in iter_records(path, fmt, columns):
        result.errors += rec.errors
        result.warnings += rec.warnings
        if isinstance(rec.example, PreferenceExample):
            result.preferences.append(rec.example)
        elif rec.example is not None:
            result.examples.append(rec.example)
    if not result.examples and not result.preferences and not result.errors:
        result.errors.append(empty_file_problem(path))
    return result


def empty_file_problem(path: Path) -> Problem:
    return Problem(0, "", "empty_file", f"'{path}' holds no examples (it is empty or has only blank lines)")


def _jsonl_records(path: Path, fmt: str) -> Iterator[Record]:
    for line_no, text, err in iter_lines(path):
        rec = Record(line_no, None)
        if err is not None:
            if err == LINE_TOO_LONG:
                rec.errors.append(Problem(line_no, "", "line_too_long", err))
            else:
                rec.errors.append(Problem(line_no, "", "invalid_encoding", err + "; save the file as UTF-8"))
            yield rec
            continue
        try:
            obj = load_json_line(text)
        except json.JSONDecodeError as exc:
            hint = ""
            if line_no == 1 and text.lstrip().startswith("["):
                hint = "; the file looks like one JSON array, but tunesmith reads JSON Lines (one object per line)"
            rec.errors.append(Problem(line_no, "", "invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}{hint}"))
            yield rec
            continue
        if not isinstance(obj, dict):
            rec.errors.append(Problem(line_no, "", "not_an_object", f"expected a JSON object, got {_kind(obj)}"))
            yield rec
            continue
        if fmt == "preference":
            rec.example = parse_preference(obj, line_no, rec.errors)
        else:
            rec.example = parse_object(obj, fmt, line_no, rec.errors, rec.warnings)
        yield rec


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _unknown_keys(obj: dict[str, Any], accepted: tuple[str, ...], where: str, line: int, errors: list[Problem]) -> bool:
    ok = True
    for key in obj:
        if key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(accepted)}"
        path = f"{where}.{key}" if where else str(key)
        label = where or "the object"
        errors.append(Problem(line, path, "unknown_key", f"{label} has unknown key {key!r}{hint}"))
        ok = False
    return ok


def parse_object(
    obj: dict[str, Any], fmt: str, line: int, errors: list[Problem], warnings: list[Problem]
) -> Example | None:
    """One JSON object in a supervised format into an Example (None if it has errors)."""
    if fmt == "prompt_completion":
        ok = _unknown_keys(obj, PAIR_KEYS, "", line, errors)
        answer_key = "completion" if "completion" in obj or "response" not in obj else "response"
        ex = _pair(obj.get("prompt"), obj.get(answer_key), "prompt", answer_key, line, errors, obj.get("system"))
        return ex if ok else None
    if fmt == "alpaca":
        ok = _unknown_keys(obj, ALPACA_KEYS, "", line, errors)
        instruction = obj.get("instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            errors.append(Problem(line, "input", "content_not_string", f"'input' must be a string, got {_kind(extra)}"))
            ok = False
        prompt = f"{instruction}\n\n{extra}" if isinstance(instruction, str) and instruction.strip() and extra and isinstance(extra, str) else instruction
        ex = _pair(prompt, obj.get("output"), "instruction", "output", line, errors, obj.get("system"))
        return ex if ok else None
    return parse_chat(obj, line, errors, warnings)


def _pair(prompt, answer, prompt_field, answer_field, line, errors, system=None) -> Example | None:
    ok = True
    for value, name in ((prompt, prompt_field), (answer, answer_field), (system, "system")):
        if name == "system" and value is None:
            continue
        if value is None:
            errors.append(Problem(line, name, "missing_content", f"'{name}' is missing"))
            ok = False
        elif not isinstance(value, str):
            errors.append(Problem(line, name, "content_not_string", f"'{name}' must be a string, got {_kind(value)}"))
            ok = False
        elif not value.strip():
            errors.append(Problem(line, name, "empty_content", f"'{name}' is empty"))
            ok = False
    if not ok:
        return None
    msgs = [Message("system", system)] if system else []
    msgs += [Message("user", prompt), Message("assistant", answer, train=True)]
    return Example(messages=tuple(msgs), line=line)


def parse_messages(raw: Any, field: str, line: int, errors: list[Problem]) -> list[Message] | None:
    """A list of message objects into Messages; None (with errors) if any is bad."""
    if not isinstance(raw, list):
        errors.append(Problem(line, field, "messages_not_list", f"'{field}' must be a list of messages, got {_kind(raw)}"))
        return None
    out: list[Message] = []
    ok = True
    for i, m in enumerate(raw):
        msg = _parse_message(m, f"{field}[{i}]", line, errors)
        if msg is None:
            ok = False
        else:
            out.append(msg)
    return out if ok else None


def _parse_message(m: Any, where: str, line: int, errors: list[Problem]) -> Message | None:
    if not isinstance(m, dict):
        errors.append(Problem(line, where, "message_not_object", f"{where} must be an object with role and content, got {_kind(m)}"))
        return None
    before = len(errors)
    role = m.get("role")
    if role is None:
        errors.append(Problem(line, f"{where}.role", "missing_role", f"{where} has no 'role' (one of {', '.join(ROLES)})"))
    elif role not in ROLES:
        close = difflib.get_close_matches(str(role), ROLES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append(Problem(line, f"{where}.role", "unknown_role", f"role {role!r} is not one of {', '.join(ROLES)}{hint}"))
    _unknown_keys(m, MESSAGE_KEYS, where, line, errors)
    tool_calls = m.get("tool_calls")
    if tool_calls is not None and not (isinstance(tool_calls, list) and all(isinstance(c, dict) for c in tool_calls)):
        errors.append(Problem(line, f"{where}.tool_calls", "invalid_tool_calls", f"{where}.tool_calls must be a list of objects, got {_kind(tool_calls)}"))
    content = m.get("content")
    if content is None and not tool_calls:
        errors.append(Problem(line, f"{where}.content", "missing_content", f"{where} has no 'content'"))
    elif content is not None and not isinstance(content, str):
        hint = " (content parts are not supported: join their text into one string)" if isinstance(content, list) else ""
        errors.append(Problem(line, f"{where}.content", "content_not_string", f"{where}.content must be a string, got {_kind(content)}{hint}"))
    elif isinstance(content, str) and not content.strip() and not tool_calls:
        errors.append(Problem(line, f"{where}.content", "empty_content", f"{where}.content is empty"))
    weight = m.get("weight", 1)
    if "weight" in m and (weight not in (0, 1) or isinstance(weight, bool) or role != "assistant"):
        why = "only assistant messages take a weight" if role != "assistant" and weight in (0, 1) else "weight must be 0 or 1"
        errors.append(Problem(line, f"{where}.weight", "invalid_weight", f"{why}, got {weight!r} on a {role!r} message"))
    if len(errors) > before:
        return None
    return Message(
        role=role,
        content=content or "",
        train=role == "assistant" and weight == 1,
        tool_calls=tool_calls or None,
        name=m.get("name") if isinstance(m.get("name"), str) else None,
    )


def parse_chat(obj: dict[str, Any], line: int, errors: list[Problem], warnings: list[Problem]) -> Example | None:
    if "messages" not in obj:
        errors.append(
            Problem(line, "messages", "missing_messages",
                    "the object has no 'messages' list (other formats: prompt/completion, "
                    "instruction/output, prompt/chosen/rejected; or pass --format)")
        )
        return None
    ok = _unknown_keys(obj, CHAT_KEYS, "", line, errors)
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        errors.append(Problem(line, "tools", "invalid_tools", f"'tools' must be a list of tool definitions, got {_kind(tools)}"))
        ok = False
    msgs = parse_messages(obj["messages"], "messages", line, errors)
    if msgs is None or not ok:
        return None
    return check_conversation(msgs, "messages", line, errors, warnings, tools or None)


def check_conversation(
    msgs: list[Message], field: str, line: int, errors: list[Problem], warnings: list[Problem], tools: Any = None
) -> Example | None:
    """Conversation-level rules: something to learn from, and ending where learning ends."""
    if not msgs:
        errors.append(Problem(line, field, "no_assistant_message", f"'{field}' is empty: there is no assistant message to learn from"))
        return None
    if not any(m.role == "assistant" for m in msgs):
        errors.append(Problem(line, field, "no_assistant_message", "the conversation has no assistant message to learn from"))
        return None
    if not any(m.train for m in msgs):
        errors.append(
            Problem(line, field, "no_trainable_tokens",
                    "every assistant message has weight 0, so nothing in this example is trained; "
                    "set weight 1 on at least one or drop the example")
        )
        return None
    if not _check_tool_calls(msgs, field, line, errors, tools):
        return None
    if msgs[-1].role != "assistant":
        last = len(msgs) - 1
        warnings.append(
            Problem(line, f"{field}[{last}].role", "last_message_not_assistant",
                    f"the conversation ends with a {msgs[-1].role!r} message, which is context that nothing "
                    "learns from; end it with the assistant answer")
        )
    return Example(messages=tuple(msgs), line=line, tools=tools)


def _check_tool_calls(msgs: list[Message], field: str, line: int, errors: list[Problem], tools: Any) -> bool:
    """Every assistant tool call names a function (one of `tools` when given) and carries
    arguments that are a JSON object valid for its `parameters`; False with errors if not."""
    import json

    declared = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            declared[fn["name"]] = fn.get("parameters") or {"type": "object"}
    before = len(errors)
    for i, m in enumerate(msgs):
        for j, call in enumerate(m.tool_calls or []):
            where = f"{field}[{i}].tool_calls[{j}]"
            fn = call.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str) or not name:
                errors.append(Problem(line, f"{where}.function", "invalid_tool_call",
                                      f"{where} needs 'function': {{'name': ..., 'arguments': '<JSON object>'}}"))
                continue
            raw = fn.get("arguments")
            try:
                arguments = json.loads(raw) if isinstance(raw, str) else None
            except ValueError as exc:
                arguments, why = None, f"is not JSON ({exc})"
            else:
                why = "must be a JSON object in a string" if not isinstance(arguments, dict) else ""
            if not isinstance(arguments, dict):
                errors.append(Problem(line, f"{where}.function.arguments", "arguments_not_json",
                                      f"the arguments of {name!r} {why}, got {_kind(raw)} {str(raw)[:60]!r}"))
                continue
            if tools is None:
                continue
            if name not in declared:
                errors.append(Problem(line, f"{where}.function.name", "unknown_function",
                                      f"the call names {name!r}, which is not in 'tools' ({', '.join(declared) or 'none'})"))
                continue
            problem = _schema_problem(arguments, declared[name])
            if problem:
                errors.append(Problem(line, f"{where}.function.arguments", "arguments_do_not_match",
                                      f"the arguments of {name!r} do not match its parameters: {problem}"))
    return len(errors) == before


def _schema_problem(value: Any, schema: Any) -> str:
    """Why `value` is not valid for the JSON Schema, or "" (a schema that is not one: "")."""
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"{exc.message}" + (f" (at {where})" if where else "")
    except jsonschema.SchemaError:
        return ""
    return ""


def parse_preference(obj: dict[str, Any], line: int, errors: list[Problem]) -> PreferenceExample | None:
    """TRL's prompt/chosen/rejected (strings or message lists) or OpenAI's DPO lines."""
    if "prompt" not in obj and ("input" in obj or any(k in obj for k in DPO_KEYS[1:5])):
        ok = _unknown_keys(obj, DPO_KEYS, "", line, errors)
        inp = obj.get("input")
        prompt = None
        if not isinstance(inp, dict) or "messages" not in inp:
            errors.append(Problem(line, "input.messages", "missing_messages", "'input' must be an object with a 'messages' list"))
        else:
            ok = _unknown_keys(inp, DPO_INPUT_KEYS, "input", line, errors) and ok
            prompt = parse_messages(inp["messages"], "input.messages", line, errors)
        names = ("preferred_output", "non_preferred_output")
        if "preferred_completion" in obj or "non_preferred_completion" in obj:
            names = ("preferred_completion", "non_preferred_completion")
        chosen = _answer(obj.get(names[0]), names[0], line, errors)
        rejected = _answer(obj.get(names[1]), names[1], line, errors)
    else:
        ok = _unknown_keys(obj, TRL_PREFERENCE_KEYS, "", line, errors)
        names = ("chosen", "rejected")
        raw_prompt = obj.get("prompt")
        prompt = None
        if raw_prompt is None:
            errors.append(Problem(line, "prompt", "missing_content", "'prompt' is missing"))
        elif isinstance(raw_prompt, str):
            if raw_prompt.strip():
                prompt = [Message("user", raw_prompt)]
            else:
                errors.append(Problem(line, "prompt", "empty_content", "'prompt' is empty"))
        else:
            prompt = parse_messages(raw_prompt, "prompt", line, errors)
        chosen = _answer(obj.get("chosen"), "chosen", line, errors)
        rejected = _answer(obj.get("rejected"), "rejected", line, errors)
    if prompt is None or chosen is None or rejected is None or not ok:
        return None
    if [m.content.strip() for m in chosen] == [m.content.strip() for m in rejected]:
        errors.append(
            Problem(line, names[1], "identical_answers",
                    f"'{names[0]}' and '{names[1]}' are the same answer, so there is no preference to learn")
        )
        return None
    return PreferenceExample(prompt=tuple(prompt), chosen=tuple(chosen), rejected=tuple(rejected), line=line)


def _answer(raw: Any, field: str, line: int, errors: list[Problem]) -> list[Message] | None:
    if raw is None:
        errors.append(Problem(line, field, "missing_content", f"'{field}' is missing: a preference pair needs both answers"))
        return None
    if isinstance(raw, str):
        if not raw.strip():
            errors.append(Problem(line, field, "empty_content", f"'{field}' is empty"))
            return None
        return [Message("assistant", raw, train=True)]
    msgs = parse_messages(raw, field, line, errors)
    if msgs is None:
        return None
    if not any(m.role == "assistant" for m in msgs):
        errors.append(Problem(line, field, "no_assistant_message", f"'{field}' holds no assistant message"))
        return None
    return [Message(m.role, m.content, train=m.role == "assistant", tool_calls=m.tool_calls) for m in msgs]
