"""Put a distill output (or rejected) file in prompt order, atomically.

`distill` appends each answer the moment it arrives, so that a crash loses nothing, and
calls `sort_by_prompt` when the run ends, so that the file does not depend on which
concurrent request happened to finish first.

    python -c "from pathlib import Path; from tunesmith.distill.order import sort_by_prompt; print(sort_by_prompt(Path('train.jsonl')))"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tunesmith.fileio import replace_atomically


def sort_by_prompt(path: Path) -> bool:
    """Rewrite an output or rejected file in prompt order; returns whether it was rewritten.

    Sorted by (prompt_line, n_index), stably: answers to the same prompt keep the order
    they were written in (an earlier run's first). Lines without those numbers (blank,
    written by hand, a torn last line) keep their order after all the others, bytes
    untouched. The new file replaces the old one atomically: a crash mid-rewrite leaves the
    old file whole (and at worst a stray `.<name>.*.tmp` beside it). Memory holds the
    position of each line, not the lines."""
    if not path.is_file():
        return False
    lines: list[tuple[tuple[int, int] | None, int, int]] = []  # (order, offset, length)
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:  # split at b"\n" only, as the lines were written
            lines.append((_prompt_order(line), offset, len(line)))
            offset += len(line)
    keyed = sorted((entry for entry in lines if entry[0] is not None), key=lambda entry: entry[0])  # stable
    ordered = keyed + [entry for entry in lines if entry[0] is None]
    if ordered == lines:
        return False
    replace_atomically(path, _read_in_order(path, ordered))
    return True


def _read_in_order(path: Path, ordered: list[tuple[tuple[int, int] | None, int, int]]) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for order, offset, length in ordered:
            fh.seek(offset)
            line = fh.read(length)
            # Only the last line can lack its newline; a keyed one may not stay last.
            yield line + b"\n" if order is not None and not line.endswith(b"\n") else line


def _prompt_order(line: bytes) -> tuple[int, int] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    # Output lines keep the numbers in their metadata, rejected lines at the top.
    meta = obj.get("metadata")
    where = meta if isinstance(meta, dict) else obj
    prompt_line, n_index = where.get("prompt_line"), where.get("n_index")
    if type(prompt_line) is not int or type(n_index) is not int:  # not bool, not float
        return None
    return prompt_line, n_index
