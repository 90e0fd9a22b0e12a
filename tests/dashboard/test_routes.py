"""The dashboard's routes and the files API's validation report, over real HTTP (no browser).

The pages and their static files need no key and carry a strict Content-Security-Policy;
GET /v1/files/{id}/validation gives the validator's report the New job page shows.
"""

from __future__ import annotations

import json

import httpx

from dashboard_helpers import dashboard_server, write_chat_jsonl  # noqa: F401 (fixture)


def test_pages_and_static_files_are_served_without_a_key(dashboard_server):
    server = dashboard_server(api_key="k", workers=0)
    for path in ("/", "/jobs/new", "/jobs/ftjob-abc", "/sweeps", "/playground", "/models"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert '<script type="module" src="/static/app.js">' in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("chart.js", "text/javascript"), ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    # Only shipped files: no traversal out of static/, no Python source.
    for bad in ("/static/__init__.py", "/static/..%2F__init__.py", "/static/nope.js"):
        assert httpx.get(server.url + bad).status_code == 404, bad
    # Nothing the page loads comes from another origin.
    html = httpx.get(server.url).text
    assert "http://" not in html and "https://" not in html
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_validation_report_of_an_uploaded_file(dashboard_server, tmp_path, tiny_model_dir, _isolated_home):
    server = dashboard_server(workers=0)
    client = server.client
    bad = client.files.create(file=open(write_chat_jsonl(tmp_path / "bad.jsonl", n=12, bad_lines={
        4: "{broken", 9: json.dumps({"messages": [{"role": "robot", "content": "x"}]})}), "rb"), purpose="fine-tune")
    good = client.files.create(file=open(write_chat_jsonl(tmp_path / "good.jsonl", n=12), "rb"), purpose="fine-tune")
    valid = client.files.create(file=open(write_chat_jsonl(tmp_path / "valid.jsonl", n=3), "rb"), purpose="fine-tune")

    # Without a model: what the upload check stored.
    r = httpx.get(f"{server.url}/v1/files/{bad.id}/validation").json()
    assert r["object"] == "file.validation" and r["ok"] is False and r["model"] is None
    assert sorted(e["line"] for e in r["errors"]) == [4, 9]
    assert r["stats"] is None and r["estimate"] is None and r["audit"] is None

    # With a model: the full report and token stats; overlap with the validation file (whose
    # examples repeat the training ones) is a warning on the lines. The server never runs
    # training steps: with no speed measured on this machine yet, the estimate says so.
    query = {"model": str(tiny_model_dir), "validation_file": valid.id}
    r = httpx.get(f"{server.url}/v1/files/{good.id}/validation", params=query, timeout=120).json()
    assert r["ok"] is True and r["examples"] == 12 and r["format"] == "chat"
    assert r["stats"]["tokens_per_epoch"] > 0 and r["stats"]["trained_tokens_per_epoch"] > 0
    assert r["estimate"]["epochs"] >= 1 and r["estimate"]["train_tokens_per_s"] is None
    assert not (_isolated_home / "speed.json").exists()
    assert any(w["code"] == "validation_overlap" for w in r["warnings"])
    # The content audit adds its leakage findings (prompt-level) and one line for the page.
    assert r["audit"].startswith("content audit: ") and "tunesmith audit" in r["audit"]
    assert {w["line"] for w in r["warnings"] if w["code"] == "leakage"} == set(range(1, 13))

    # Once `tunesmith validate` measured this shape here, the server reads the cached speed.
    from tunesmith.data.validate import probe_shape
    from tunesmith.models.registry import resolve_model
    from tunesmith.train.speed import measure_train_tokens_per_s

    seq_len, batch_size = probe_shape(r["stats"])
    measured = measure_train_tokens_per_s(resolve_model(str(tiny_model_dir)), seq_len=seq_len, batch_size=batch_size,
                                          home=_isolated_home)
    r = httpx.get(f"{server.url}/v1/files/{good.id}/validation", params=query, timeout=120).json()
    assert r["estimate"]["train_tokens_per_s"] == round(measured, 1) and r["estimate"]["time_s"] > 0

    r = httpx.get(f"{server.url}/v1/files/{good.id}/validation", params={"model": "no-such-model"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(f"{server.url}/v1/files/file-missing/validation")
    assert r.status_code == 404 and "file-missing" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/files/{good.id}/validation", params={"validation_file": valid.id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"


def test_every_static_file_is_package_data():
    """A non-editable install carries the dashboard: each shipped file matches a pattern."""
    import tomllib
    from pathlib import Path

    from tunesmith.dashboard import STATIC_DIR

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tunesmith"]
    package = STATIC_DIR.parent.parent
    shipped = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
    assert shipped, STATIC_DIR
    for path in shipped:
        rel = path.relative_to(package)
        assert any(rel.match(pattern.replace("**/", "")) or rel.match(pattern) for pattern in patterns), rel
