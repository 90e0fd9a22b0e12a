"""Writing a file so that a crash never leaves half of it: the bytes go to a temporary file
beside the target, are fsynced, and the temporary file is renamed over the target. A reader
sees the old file or the new one, never a mix; after a crash at worst a stray
`.<name>.<random>.tmp` is left beside it.

    from tunesmith.fileio import write_atomically
    write_atomically(Path("run.json"), json.dumps(info))
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable


def replace_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to a temporary file beside `path`, fsync it, and rename it over `path`.

    A new file gets the mode a plain open() would give it (0o666 less the umask); a replaced
    one keeps its mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.writelines(chunks)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomically(path: Path, data: bytes | str) -> None:
    """`path.write_bytes(data)` (or write_text, UTF-8) that never leaves a half-written file."""
    replace_atomically(path, [data.encode() if isinstance(data, str) else data])
