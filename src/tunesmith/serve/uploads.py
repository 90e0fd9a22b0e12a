"""Streaming multipart uploads with a size limit enforced on every chunk.

Starlette's form parser spools a whole upload before the route sees it; this one writes
the `file` part straight into a temporary file in the storage folder and stops at the
limit, so an oversized upload never fills the disk. The client's file name is returned as
cleaned metadata, never used as a path.

    python -c "from tunesmith.serve.uploads import clean_filename; print(clean_filename(b'../../x.jsonl'))"
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from starlette.requests import Request

from tunesmith.serve.errors import APIError

MAX_FORM_FIELD_BYTES = 64 * 1024
MAX_FORM_BYTES = 4 * MAX_FORM_FIELD_BYTES
"""All of a body besides the file's bytes: the other fields, boundaries and part headers."""


def clean_filename(raw: bytes | None) -> str:
    """The client's file name as metadata: decoded, control characters and NULs removed."""
    name = (raw or b"").decode("utf-8", errors="replace")
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:255] or "upload.jsonl"


async def receive_upload(request: Request, tmp_dir: Path, max_bytes: int) -> tuple[dict[str, str], dict[str, Any]]:
    """Stream a multipart body: form fields into memory, the `file` part into a temp file.

    The size limit is checked on every chunk, so an oversized upload is refused (413) after
    at most `max_bytes` were written, whatever Content-Length claimed; the whole body, every
    field included, may exceed it by MAX_FORM_BYTES at most. A malformed body is a 400.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise APIError(400, "upload files as multipart/form-data with fields 'file' and 'purpose'",
                       code="invalid_request")
    too_large = APIError(413, f"the file is larger than this server's upload limit of {max_bytes:,} bytes; "
                              "split it or raise --max-upload-mb", param="file", code="file_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MAX_FORM_BYTES:
        raise too_large

    fields: dict[str, str] = {}
    upload: dict[str, Any] = {}
    part: dict[str, Any] = {}
    header = {"field": b"", "value": b""}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, data=bytearray(), fh=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["name"] = disp.get(b"name", b"").decode("utf-8", errors="replace")
        if part["name"] == "file" and "path" not in upload:
            fd_path = tmp_dir / f".upload-{secrets.token_hex(8)}.part"
            part["fh"] = open(fd_path, "xb")
            upload.update(path=fd_path, filename=clean_filename(disp.get(b"filename")), bytes=0,
                          sha256=hashlib.sha256())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if part.get("fh") is not None:
            upload["bytes"] += len(chunk)
            if upload["bytes"] > max_bytes:
                raise too_large
            part["fh"].write(chunk)
            upload["sha256"].update(chunk)
        else:
            part["data"] += chunk
            if len(part["data"]) > MAX_FORM_FIELD_BYTES:
                raise APIError(400, f"form field '{part.get('name')}' is longer than {MAX_FORM_FIELD_BYTES} bytes",
                               code="invalid_request")

    def on_part_end() -> None:
        if part.get("fh") is not None:
            part["fh"].flush()
            os.fsync(part["fh"].fileno())
            part["fh"].close()
            part["fh"] = None
        elif part.get("name"):
            fields[part["name"]] = part["data"].decode("utf-8", errors="replace")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
    })
    received = 0
    try:
        async for chunk in request.stream():
            # Every part counts: the file, the other fields and their headers (no more than
            # MAX_FORM_BYTES besides the file), whatever Content-Length said.
            received += len(chunk)
            if received > max_bytes + MAX_FORM_BYTES:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except BaseException:
        if part.get("fh") is not None:
            part["fh"].close()
        if upload.get("path"):
            upload["path"].unlink(missing_ok=True)
        raise
    return fields, upload
