"""/v1/files with the official openai client against a live server: storage, names, limits."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from jobs_helpers import jobs_server, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)


def test_upload_retrieve_list_content_delete(jobs_server, tmp_path):
    live = jobs_server(workers=0)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    f = live.client.files.create(file=open(data, "rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.filename == "train.jsonl" and f.bytes == data.stat().st_size
    assert f.status == "processed" and f.status_details is None
    assert live.client.files.retrieve(f.id).filename == "train.jsonl"
    assert live.client.files.content(f.id).read() == data.read_bytes()
    assert [x.id for x in live.client.files.list()] == [f.id]
    stored = sorted(p.name for p in (live.home / "files").iterdir())
    assert stored == [f"{f.id}.jsonl"]  # generated id, not the client's name
    assert live.client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        live.client.files.retrieve(f.id)
    assert list((live.home / "files").iterdir()) == []


def test_a_file_with_errors_is_stored_with_its_problems(jobs_server, tmp_path):
    live = jobs_server(workers=0)
    data = write_chat_jsonl(tmp_path / "bad.jsonl", n=12, bad_lines={3: "{not json"})
    f = live.client.files.create(file=open(data, "rb"), purpose="fine-tune")
    assert f.status == "processed"
    assert "line 3 (invalid_json)" in f.status_details


@pytest.mark.parametrize("name", ["../../x.jsonl", "/tmp/abs-evil.jsonl", "a\x00b/../../nul.jsonl", "..", ""])
def test_hostile_upload_names_write_nothing_outside_the_storage_root(jobs_server, tmp_path, name):
    live = jobs_server(workers=0)
    body = write_chat_jsonl(tmp_path / "ok.jsonl").read_bytes()
    before = set(tmp_path.parent.rglob("*"))
    # httpx builds the multipart body itself, so the hostile name reaches the server verbatim.
    r = httpx.post(f"{live.url}/v1/files", data={"purpose": "fine-tune"},
                   files={"file": (name, io.BytesIO(body), "application/jsonl")}, timeout=30)
    assert r.status_code == 200, r.text
    obj = r.json()
    assert "\x00" not in obj["filename"]
    created = set(tmp_path.parent.rglob("*")) - before
    files_dir = live.home / "files"
    assert created, "the upload was stored"
    for path in created:
        # Only the database (and its WAL files) and the stored file under files/ appeared.
        assert path == files_dir or path.parent == files_dir or path.name.startswith("tunesmith.db"), path
    assert (files_dir / f"{obj['id']}.jsonl").read_bytes() == body
    assert not (tmp_path / "x.jsonl").exists() and not (live.home.parent / "x.jsonl").exists()
    assert not __import__("pathlib").Path("/tmp/abs-evil.jsonl").exists()


def test_oversized_upload_is_refused_while_streaming(jobs_server, tmp_path):
    live = jobs_server(workers=0, max_upload_bytes=4096)
    big = write_chat_jsonl(tmp_path / "big.jsonl", n=2000)
    assert big.stat().st_size > 50_000
    with pytest.raises(openai.APIStatusError) as exc:
        live.client.files.create(file=open(big, "rb"), purpose="fine-tune")
    assert exc.value.status_code == 413
    assert "upload limit of 4,096 bytes" in exc.value.message

    # Chunked, with no Content-Length to trust: refused after the limit, nothing kept.
    def chunks():
        boundary = b"xyzBOUNDARY"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(100):
            yield b"x" * 1024
        yield b"\r\n--" + boundary + b"--\r\n"

    try:
        r = httpx.post(f"{live.url}/v1/files", content=chunks(), timeout=30,
                       headers={"content-type": "multipart/form-data; boundary=xyzBOUNDARY"})
        assert r.status_code == 413
    except httpx.HTTPError:
        pass  # the server may close the connection before the client finished sending
    assert [p.name for p in (live.home / "files").iterdir()] == []
    assert live.store.list_files()[0] == []


def test_wrong_purpose_and_missing_file_are_400(jobs_server, tmp_path):
    live = jobs_server(workers=0)
    data = write_chat_jsonl(tmp_path / "t.jsonl")
    with pytest.raises(openai.BadRequestError) as exc:
        live.client.files.create(file=open(data, "rb"), purpose="assistants")
    assert "purpose 'assistants' is not supported" in exc.value.message
    r = httpx.post(f"{live.url}/v1/files", data={"purpose": "fine-tune"}, timeout=30,
                   files={"other": ("x", b"y")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert [p.name for p in (live.home / "files").iterdir()] == []
