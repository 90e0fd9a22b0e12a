"""One error answer for the whole server: the inference routes, the jobs routes mounted next to
them, and the jobs-only app answer the same exception with the same status and OpenAI's body,
and check the API key the same way. Real apps (`create_app` with the jobs router, and
`create_jobs_app`) over a real jobs store, driven in-process by fastapi's TestClient; the
engine is a stand-in that raises what a test gives it (the routes only need its protocol)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tunesmith.data.tool_syntax import HERMES
from tunesmith.errors import DataError, ModelNotFoundError, TunesmithError, UsageError
from tunesmith.generate.engine import ModelCard
from tunesmith.serve.app import create_app
from tunesmith.serve.errors import INTERNAL_ERROR
from tunesmith.serve.jobs_api import JobsService, create_jobs_app
from tunesmith.settings import Settings

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}


class RaisingEngine:
    """Serves one model, "base"; rendering a chat raises `self.error`."""

    base_id = "base"
    max_context = 64
    message_tokens: dict = {}
    tool_syntax = HERMES

    def __init__(self) -> None:
        self.error: Exception = RuntimeError("no error set")

    def models(self) -> list[ModelCard]:
        return [ModelCard("base", 0)]

    def stats(self) -> dict[str, int]:
        return {}

    def render_chat(self, messages, tools=None):
        raise self.error

    def encode(self, text):
        raise self.error

    def submit(self, *args, **kwargs):
        raise AssertionError("the error comes before any generation")

    def add_adapter(self, name, path):
        raise self.error

    def remove_adapter(self, name):
        raise self.error

    def close(self) -> None:
        pass


@pytest.fixture
def apps(_isolated_home):
    """(engine, store, full server client, jobs-only client), both apps behind KEY."""
    from tunesmith.jobs.store import open_store

    engine, store = RaisingEngine(), open_store()
    service = JobsService(store, workers=0)
    full = create_app(engine, Settings(home=_isolated_home, api_key=KEY), routers=[service.router])
    jobs_only = create_jobs_app(service, api_key=KEY)
    # Not used as context managers: the jobs lifespan (workers, publisher) is not wanted here.
    return (engine, store, TestClient(full, raise_server_exceptions=False),
            TestClient(jobs_only, raise_server_exceptions=False))


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("exc, status, code", [
    (UsageError("the option --x is wrong; use --y"), 400, None),
    (DataError("line 3 of data.jsonl has no messages; add them"), 400, None),
    (ModelNotFoundError("model 'nope' is not available; pull it"), 404, "model_not_found"),
])
def test_a_tunesmith_error_has_one_status_on_chat_and_jobs_routes(apps, monkeypatch, exc, status, code):
    engine, store, full, jobs_only = apps
    engine.error = exc
    monkeypatch.setattr(store, "list_files", lambda *a, **k: (_ for _ in ()).throw(exc))

    answers = [
        full.post("/v1/chat/completions", json=CHAT, headers=AUTH),
        full.get("/v1/files", headers=AUTH),
        jobs_only.get("/v1/files", headers=AUTH),
    ]
    assert [r.status_code for r in answers] == [status] * 3
    errors = [_error(r) for r in answers]
    assert errors[0] == errors[1] == errors[2]
    assert errors[0]["message"] == str(exc) and errors[0]["code"] == code
    assert errors[0]["type"] == "invalid_request_error"


@pytest.mark.parametrize("exc", [
    TunesmithError("the disk is full while writing /srv/secret/run/adapter"),  # the server's problem
    RuntimeError("bug at /srv/secret/engine.py"),
])
def test_what_the_request_cannot_fix_is_a_generic_500_everywhere(apps, monkeypatch, exc):
    engine, store, full, jobs_only = apps
    engine.error = exc
    monkeypatch.setattr(store, "list_files", lambda *a, **k: (_ for _ in ()).throw(exc))

    for resp in (full.post("/v1/chat/completions", json=CHAT, headers=AUTH),
                 full.get("/v1/files", headers=AUTH), jobs_only.get("/v1/files", headers=AUTH)):
        assert resp.status_code == 500
        err = _error(resp)
        assert err["message"] == INTERNAL_ERROR and err["type"] == "server_error"
        assert "secret" not in resp.text


def test_the_api_key_is_checked_alike_on_every_route(apps):
    _, _, full, jobs_only = apps
    routes = [(full, "POST", "/v1/chat/completions"), (full, "GET", "/v1/models"),
              (full, "GET", "/v1/fine_tuning/jobs"), (jobs_only, "GET", "/v1/fine_tuning/jobs")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer "}):
        answers = [client.request(method, path, json=CHAT, headers=headers) for client, method, path in routes]
        assert [r.status_code for r in answers] == [401] * len(routes), headers
        assert all(r.headers["www-authenticate"] == "Bearer" for r in answers)
        errors = [_error(r) for r in answers]
        assert all(e == errors[0] for e in errors) and errors[0]["code"] == "invalid_api_key"
        assert errors[0]["type"] == "invalid_request_error"
    assert "didn't provide an API key" in _error(full.get("/v1/models"))["message"]
    wrong = _error(full.get("/v1/models", headers={"Authorization": "Bearer wrong"}))
    assert wrong["message"].startswith("Incorrect API key provided") and "wrong" not in wrong["message"]

    # The scheme is case-insensitive; the key is not. /health needs no key.
    assert full.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert full.get("/v1/models", headers={"Authorization": f"Bearer {KEY.upper()}"}).status_code == 401
    assert jobs_only.get("/v1/fine_tuning/jobs", headers=AUTH).json()["data"] == []
    assert full.get("/health").status_code == 200


def test_a_malformed_body_is_a_400_naming_the_param_on_both(apps):
    _, _, full, jobs_only = apps
    bad_chat = full.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"}, headers=AUTH)
    assert bad_chat.status_code == 400
    assert _error(bad_chat)["param"] == "temperature" and _error(bad_chat)["code"] == "invalid_parameter"

    job = {"model": "base", "training_file": "file-x", "hyperparameters": {"n_epochs": 0}}
    for client in (full, jobs_only):
        resp = client.post("/v1/fine_tuning/jobs", json=job, headers=AUTH)
        assert resp.status_code == 400
        err = _error(resp)
        assert err["param"] == "hyperparameters.n_epochs" and err["code"] == "invalid_parameter"
        assert "greater than or equal to 1" in err["message"] and "(got 0)" in err["message"]

        unknown = _error(client.post("/v1/fine_tuning/jobs", json={**job, "n_epohcs": 3}, headers=AUTH))
        assert "unknown parameter 'n_epohcs'" in unknown["message"]
        not_json = client.post("/v1/fine_tuning/jobs", content=b"{oops",
                               headers={**AUTH, "content-type": "application/json"})
        assert not_json.status_code == 400 and _error(not_json)["code"] == "invalid_json"
        query = client.get("/v1/files?limit=many", headers=AUTH)
        assert query.status_code == 400 and _error(query)["param"] == "limit"
        nowhere = client.get("/v1/nowhere", headers=AUTH)
        assert nowhere.status_code == 404 and _error(nowhere)["code"] == "not_found"
