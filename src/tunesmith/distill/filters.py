"""`--filter`: keep only teacher answers of the wanted shape.

- `json`: the answer (surrounding whitespace aside) parses as JSON
- `label:FILE`: the answer, stripped, is one of FILE's lines (one label a line)
- `regex:PATTERN`: the whole answer, stripped, matches PATTERN (Python `re.fullmatch`,
  `.` also matching newlines)

    python -c "from tunesmith.distill.filters import build_filter; print(build_filter('regex:[0-9]+')('42'))"
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from tunesmith.errors import UsageError

AnswerFilter = Callable[[str], bool]
FILTER_HELP = "json, label:FILE (one label a line) or regex:PATTERN (the whole answer must match)"


def build_filter(spec: str | None) -> AnswerFilter | None:
    """The predicate for a --filter value (None: keep every answer)."""
    if spec is None or spec == "":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "json" and not arg:
        return _is_json
    if kind == "label" and arg:
        return _label_filter(Path(arg))
    if kind == "regex" and arg:
        try:
            pattern = re.compile(arg, re.DOTALL)
        except re.error as exc:
            raise UsageError(f"--filter regex:{arg} is not a valid regular expression ({exc}); "
                             "quote it in the shell and escape special characters") from None
        return lambda answer: pattern.fullmatch(answer.strip()) is not None
    raise UsageError(f"--filter '{spec}' is not understood; accepted: {FILTER_HELP}")


def _is_json(answer: str) -> bool:
    try:
        json.loads(answer)
    except json.JSONDecodeError:
        return False
    return True


def _label_filter(path: Path) -> AnswerFilter:
    if not path.is_file():
        raise UsageError(f"--filter label:{path}: the label file does not exist; give a file with one label a line")
    labels = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    if not labels:
        raise UsageError(f"--filter label:{path}: the label file holds no labels (one label a line)")
    return lambda answer: answer.strip() in labels
