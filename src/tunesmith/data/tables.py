"""CSV and TSV files: one chat example per row through a column mapping.

The line of a row is the line it starts on (the header is line 1; a quoted cell may span
lines), so it matches what an editor shows. Rows are streamed; undecodable bytes and
malformed quoting are errors at their row, and the scan goes on.

    python -c "from tunesmith.data.formats import read_data, ColumnMapping; \
print(len(read_data('data/banking77/train.csv', columns=ColumnMapping('text', 'category')).examples))"
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.example import ColumnMapping, Example, Message, Problem, Record
from tunesmith.errors import UsageError


def _has_bad_bytes(text: str) -> bool:
    # Undecodable bytes arrive as lone surrogates (errors="surrogateescape").
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def table_records(path: Path, fmt: str, columns: ColumnMapping) -> Iterator[Record]:
    delimiter = "\t" if fmt == "tsv" else ","
    old_limit = csv.field_size_limit()
    # The default limit (128 KiB per field) would reject a long document in one cell.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, "rb") as fh:
            stream = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
            # strict: a stray quote is an error at its row instead of silently merging rows.
            reader = csv.reader(stream, delimiter=delimiter, strict=True)
            try:
                header = next(reader, None)
            except csv.Error as exc:
                yield Record(1, None, [Problem(1, "", "invalid_csv", f"the header cannot be read: {exc}")])
                return
            if header is None:
                return
            if any(_has_bad_bytes(h) for h in header):
                yield Record(1, None, [Problem(1, "", "invalid_encoding", "the header is not valid UTF-8; save the file as UTF-8")])
                return
            i_in, i_out = _column_indexes(path, header, columns)
            yield from _table_rows(reader, columns, i_in, i_out)
    finally:
        csv.field_size_limit(old_limit)


def _column_indexes(path: Path, header: list[str], columns: ColumnMapping) -> tuple[int, int | None]:
    wanted = [c for c in (columns.input_column, columns.output_column) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UsageError(
            f"{path}: column(s) {', '.join(repr(c) for c in missing)} not found; the header has "
            f"{', '.join(repr(h) for h in header)}; choose with --input-column and --output-column"
        )
    i_out = header.index(columns.output_column) if columns.output_column else None
    return header.index(columns.input_column), i_out


def _table_rows(reader: Any, columns: ColumnMapping, i_in: int, i_out: int | None) -> Iterator[Record]:
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            hint = ""
            if "end of data" in str(exc):
                hint = "; a quoted cell that starts here is never closed, so the rest of the file ran into it"
            yield Record(start, None, [Problem(start, "", "invalid_csv", f"the row is not valid CSV ({exc}){hint}")])
            continue
        end = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        rec = Record(start, None)
        if any(_has_bad_bytes(c) for c in row):
            rec.errors.append(Problem(start, "", "invalid_encoding", "the row has bytes that are not valid UTF-8; save the file as UTF-8"))
            yield rec
            continue
        text = row[i_in] if i_in < len(row) else ""
        answer = row[i_out] if i_out is not None and i_out < len(row) else None
        if not text.strip():
            rec.errors.append(Problem(start, columns.input_column, "empty_content", f"column '{columns.input_column}' is empty"))
        if i_out is not None and not (answer or "").strip():
            rec.errors.append(Problem(start, columns.output_column or "", "empty_content", f"column '{columns.output_column}' is empty"))
        if not rec.errors:
            msgs = [Message("system", columns.system)] if columns.system else []
            msgs.append(Message("user", text))
            if answer is not None:
                msgs.append(Message("assistant", answer, train=True))
            rec.example = Example(messages=tuple(msgs), line=start)
        yield rec
