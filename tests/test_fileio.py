"""tunesmith.fileio: a file written atomically is the old one or the new one, never half."""

from __future__ import annotations

import os

import pytest


def test_a_rewrite_that_dies_half_way_leaves_the_old_file_whole(tmp_path):
    from tunesmith.fileio import replace_atomically

    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "train.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n')

    def dies_half_way():
        yield b'{"b": 2}\n'
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of the rewrite

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, dies_half_way())
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert [p.name for p in folder.iterdir()] == ["train.jsonl"]


def test_an_atomic_write_keeps_a_files_mode_and_gives_a_new_one_the_umasks(tmp_path):
    from tunesmith.fileio import write_atomically

    folder = tmp_path / "files"
    folder.mkdir()
    private = folder / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    write_atomically(private, '{"a": 1}')
    assert private.read_text() == '{"a": 1}' and private.stat().st_mode & 0o777 == 0o600
    old = os.umask(0o022)
    try:
        write_atomically(folder / "new.json", b"[]")
    finally:
        os.umask(old)
    assert (folder / "new.json").read_bytes() == b"[]" and (folder / "new.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["new.json", "private.json"]  # no temporary file left
