"""Storage every node reads (`--storage URI`): uploaded files and published adapters, so a
jobs worker need not share `$TUNESMITH_HOME` with the API node, only the database.

    tunesmith serve  --db postgresql://db/tunesmith --workers 0 --storage s3://bucket/tunesmith
    tunesmith worker --db postgresql://db/tunesmith --storage s3://bucket/tunesmith

Keys mirror paths under `$TUNESMITH_HOME`: `files/<file-id>.jsonl` (an upload, a job's result
file) and `jobs/<job-id>/run/adapter/`, `jobs/<job-id>/checkpoints/step-N/` (adapters). Whoever
writes a file or folder locally also puts it here; whoever lacks it locally fetches it into
the same place under its own home:

- a file is checked against the size and sha256 its database row records;
- a folder is published file by file, then its `manifest.json` (each file's size and sha256)
  last, so a folder still being written is never fetched; a fetch checks every file against
  the manifest and renames the folder into place once whole.

Every part of a key is checked (letters, digits, '.', '_', '-', never '..'), so no id or name
read from the database or a manifest reaches outside the prefix or the local home.
pyarrow.fs does the I/O (file://, s3://, gs://, abfs://, hdfs://): `pip install
'tunesmith[storage]'` (Ray Train brings it too); it is imported only when a storage URI is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from tunesmith.errors import TunesmithError, UsageError

MANIFEST_FILE = "manifest.json"
"""In a published folder: {"files": {relative path: {"bytes": N, "sha256": HEX}}}, written last."""
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_CHUNK = 1 << 20
PYARROW_MISSING = "--storage needs pyarrow: pip install 'tunesmith[storage]' (the ray extra brings it too)"


class StorageError(TunesmithError):
    """The shared storage could not be read or written, or held something that does not check out."""


def storage_key(rel: str | os.PathLike[str]) -> str:
    """`rel` as a key under the prefix, refused unless every part is a plain name."""
    parts = PurePosixPath(str(rel).replace(os.sep, "/")).parts
    bad = [p for p in parts if not _PART.match(p) or p in (".", "..")]
    if not parts or bad or str(rel).startswith("/"):
        raise StorageError(f"refusing storage path '{rel}': each part must be letters, digits, '.', '_' or '-' "
                           "(no '..', not absolute)")
    return "/".join(parts)


class SharedStorage:
    """One storage URI and the local root (`$TUNESMITH_HOME`) it mirrors."""

    def __init__(self, uri: str, root: Path):
        try:
            import pyarrow.fs as pafs
        except ImportError:
            raise UsageError(PYARROW_MISSING) from None
        try:
            self.fs, prefix = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # ArrowInvalid: no scheme, an unknown one, a bad bucket name
            raise UsageError(f"--storage '{uri}': {exc}; give a URI such as s3://bucket/prefix or "
                             "file:///shared/folder") from None
        self.uri, self.prefix, self.root = uri, prefix.rstrip("/"), Path(root)

    def _remote(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def _local(self, key: str) -> Path:
        path = self.root / key
        if not path.resolve().is_relative_to(self.root.resolve()):  # a symlink inside the home
            raise StorageError(f"refusing storage path '{key}': it resolves outside {self.root}")
        return path

    # ------------------------------------------------------------------ files

    def put_file(self, rel: str | os.PathLike[str]) -> None:
        """Copy ROOT/rel to the storage."""
        key = storage_key(rel)
        self._upload(self._local(key), key)

    def fetch_file(self, rel: str | os.PathLike[str], size: int | None = None, sha256: str | None = None) -> Path:
        """ROOT/rel, fetched from the storage first when missing here and checked against `size`
        and `sha256` (the database row's)."""
        key = storage_key(rel)
        dest = self._local(key)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                got_size, digest = self._download(key, out)
            _check(key, got_size, digest, size, sha256)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def delete_file(self, rel: str | os.PathLike[str]) -> None:
        try:
            self.fs.delete_file(self._remote(storage_key(rel)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"could not delete {self.uri}/{rel}: {exc}") from None

    # ------------------------------------------------------------------ folders

    def put_dir(self, rel: str | os.PathLike[str]) -> None:
        """Copy the folder ROOT/rel to the storage, its manifest last; files an earlier copy had
        and this one has not are deleted after it (a folder published again, e.g. a run's
        snapshot at each checkpoint)."""
        key = storage_key(rel)
        local = self._local(key)
        try:
            before = self._manifest(key) or {}
        except StorageError:  # unreadable: overwritten below, its files left
            before = {}
        manifest: dict[str, Any] = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = storage_key(path.relative_to(local).as_posix())
            size, digest = self._upload(path, f"{key}/{name}")
            manifest[name] = {"bytes": size, "sha256": digest}
        body = (json.dumps({"files": manifest}, indent=2) + "\n").encode()
        self._write(f"{key}/{MANIFEST_FILE}", body)
        for name in set(before) - set(manifest):
            try:
                self.fs.delete_file(self._remote(f"{key}/{storage_key(name)}"))
            except (OSError, StorageError):  # gone already, or a name that was never ours
                pass

    def _manifest(self, key: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self._remote(f"{key}/{MANIFEST_FILE}")) as fh:
                files = json.loads(fh.read())["files"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"could not read {self.uri}/{key}/{MANIFEST_FILE}: {exc}") from None
        if not isinstance(files, dict):
            raise StorageError(f"{self.uri}/{key}/{MANIFEST_FILE} lists no files")
        return files

    def fetch_dir(self, rel: str | os.PathLike[str]) -> Path | None:
        """ROOT/rel, fetched from the storage when missing here; None when the storage has no
        published folder of that name either."""
        key = storage_key(rel)
        dest = self._local(key)
        if dest.is_dir():
            return dest
        manifest = self._manifest(key)
        if manifest is None:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
        try:
            for name, want in manifest.items():
                if not isinstance(want, dict) or not isinstance(want.get("sha256"), str):
                    raise StorageError(f"{self.uri}/{key}/{MANIFEST_FILE} gives no sha256 for '{name}'")
                target = tmp / storage_key(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    got_size, digest = self._download(f"{key}/{storage_key(name)}", out)
                _check(f"{key}/{name}", got_size, digest, want.get("bytes"), want.get("sha256"))
            try:
                os.rename(tmp, dest)
            except OSError:  # fetched meanwhile by another thread or process: keep theirs
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ------------------------------------------------------------------ bytes

    def _upload(self, path: Path, key: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        try:
            self.fs.create_dir(self._remote(key).rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as src, self.fs.open_output_stream(self._remote(key)) as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise StorageError(f"could not write {self.uri}/{key}: {exc}") from None
        return size, digest.hexdigest()

    def _write(self, key: str, body: bytes) -> None:
        try:
            with self.fs.open_output_stream(self._remote(key)) as out:
                out.write(body)
        except OSError as exc:
            raise StorageError(f"could not write {self.uri}/{key}: {exc}") from None

    def _download(self, key: str, out: Any) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open_input_stream(self._remote(key)) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} is missing from the shared storage") from None
        except OSError as exc:
            raise StorageError(f"could not read {self.uri}/{key}: {exc}") from None
        return size, digest.hexdigest()


def _check(key: str, size: int, digest: str, want_size: int | None, want_sha256: str | None) -> None:
    if want_size is not None and size != want_size:
        raise StorageError(f"{key} in the shared storage has {size} bytes, {want_size} were recorded; "
                           "it was changed or cut short")
    if want_sha256 is not None and digest != want_sha256:
        raise StorageError(f"{key} in the shared storage does not match its recorded sha256; it was changed")
