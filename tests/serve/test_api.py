"""The HTTP API on a live loopback server, driven with the official openai client."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from serve_helpers import live_server, make_adapter, wait_until_idle

from tunesmith.generate.engine import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(engine, model: str, messages=QUESTION, max_tokens: int = 8):
    return engine.generate(engine.render_chat(messages), model, SamplingParams(max_tokens, 0.0))


def test_list_and_get_models(client, engine):
    ids = [m.id for m in client.models.list().data]
    assert ids == [engine.base_id, "alpha", "beta", "gamma"]
    alpha = client.models.retrieve("alpha")
    assert alpha.id == "alpha" and alpha.owned_by == "tunesmith" and alpha.model_extra["parent"] == engine.base_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completion_matches_engine(client, engine):
    resp = client.chat.completions.create(model=engine.base_id, messages=QUESTION, max_tokens=8, temperature=0)
    text, finish, n = greedy(engine, engine.base_id)
    choice = resp.choices[0]
    assert (choice.message.content, choice.finish_reason, choice.message.role) == (text, "length", "assistant")
    prompt_len = len(engine.render_chat(QUESTION))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        prompt_len, 8, prompt_len + 8)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_adapter_by_name(client, engine):
    outputs = {}
    for model in ("alpha", "beta"):
        resp = client.chat.completions.create(model=model, messages=QUESTION, max_completion_tokens=8, temperature=0)
        outputs[model] = resp.choices[0].message.content
        assert outputs[model] == greedy(engine, model)[0] and resp.model == model
    assert outputs["alpha"] != outputs["beta"]


def test_streaming(client, engine):
    stream = client.chat.completions.create(
        model="gamma", messages=QUESTION, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == greedy(engine, "gamma")[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_ends_with_done(server, engine):
    body = {"model": engine.base_id, "messages": QUESTION, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(e["choices"][0]["delta"]) <= {"content"} for e in events[1:]) and "usage" not in events[1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_n_seed_and_stop(client, engine):
    kwargs = dict(model="alpha", messages=QUESTION, max_tokens=6, temperature=1.0, seed=5, n=2)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 12
    text = greedy(engine, "alpha")[0]
    resp = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=8, temperature=0, stop=[text[2:5]])
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == (text[: text.find(text[2:5])], "stop")


def test_text_completions(client, engine):
    resp = client.completions.create(model="beta", prompt="The quick brown fox", max_tokens=5, temperature=0)
    want = engine.generate(engine.encode("The quick brown fox"), "beta", SamplingParams(5, 0.0))
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (want[0], "length")
    assert resp.usage.prompt_tokens == len(engine.encode("The quick brown fox")) and resp.object == "text_completion"
    streamed = list(client.completions.create(model="beta", prompt="The quick brown fox", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want[0]
    assert all(c.choices for c in streamed)  # no usage chunk unless asked for
    asked = list(client.completions.create(model="beta", prompt="The quick brown fox", max_tokens=5, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    usage, n_prompt = asked[-1].usage, len(engine.encode("The quick brown fox"))
    assert asked[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        n_prompt, 5, n_prompt + 5)


def test_concurrent_requests_do_not_cross_talk(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    jobs = [(m, q) for m in (engine.base_id, "alpha", "beta", "gamma")
            for q in ("What is the capital of France?", "How do I reset my password? " * 4)]
    want = {job: greedy(engine, job[0], [{"role": "user", "content": job[1]}], 10)[0] for job in jobs}
    got: dict = {}
    barrier = threading.Barrier(len(jobs))

    def ask(job):
        barrier.wait()
        resp = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                              max_tokens=10, temperature=0)
        got[job] = resp.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert engine.stats()["peak_rows"] >= 2


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert info.value.body["param"] == "model" and "nope" in info.value.body["message"]
    err = _error(httpx.post(server + "/v1/completions", json={"model": "nope", "prompt": "x"}))
    assert err["code"] == "model_not_found"


def test_bad_parameters_are_400_naming_them(client, engine, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.base_id, messages=QUESTION, temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.base_id, messages=QUESTION, extra_body={"best_of": 3})
    assert info.value.body["param"] == "best_of" and "unknown parameter" in info.value.body["message"]
    err = _error(httpx.post(server + "/v1/chat/completions", json={"model": engine.base_id}))
    assert err["param"] == "messages"
    err = _error(httpx.post(server + "/v1/chat/completions",
                            json={"model": engine.base_id, "messages": [{"role": "robot", "content": "x"}]}))
    assert err["param"] == "messages[0].role" and "robot" in err["message"]
    err = _error(httpx.post(server + "/v1/chat/completions",
                            json={"model": engine.base_id, "messages": [{"role": "user", "content": 5}], "n": 0}))
    assert err["param"] == "messages[0].content" and "'n'" in err["message"]


def test_prompt_longer_than_context_is_400(client, engine):
    long = [{"role": "user", "content": "card " * (engine.max_context + 10)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.base_id, messages=long)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.base_id, messages=QUESTION, max_tokens=engine.max_context)
    assert info.value.body["param"] == "max_tokens"


def test_malformed_and_huge_bodies_are_refused(server):
    err = _error(httpx.post(server + "/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"}))
    assert err["code"] == "invalid_json"
    resp = httpx.post(server + "/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413 and _error(resp)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    resp = httpx.post(server + "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert _error(httpx.get(server + "/v1/nowhere"))["code"] == "not_found"
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_client_disconnect_mid_stream_frees_the_row(server, engine):
    """A client that hangs up mid-stream gets its row cancelled (the engine counts it) long
    before its 400 tokens. On a loaded machine the tiny model can outrun this thread and the
    server's disconnect poll (DISCONNECT_POLL_S) and finish the row first; such a try proves
    nothing either way and is repeated. A server that never cancels fails every try."""
    body = {"model": "alpha", "messages": QUESTION, "max_tokens": 400, "temperature": 0, "stream": True}
    tries = []
    for _ in range(5):
        cancelled = engine.stats()["cancelled"]
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                seen += bool(line)
                if seen >= 3:
                    break
            running = engine.stats()["running"]
        # the connection is closed here
        stats = wait_until_idle(engine)
        assert stats["running"] == 0
        tries.append((running, stats["cancelled"] - cancelled))
        if tries[-1] == (1, 1):
            break
    assert tries[-1] == (1, 1), f"(rows running at the hang-up, rows cancelled) in each try: {tries}"
    assert greedy(engine, "alpha")[1] == "length"  # and the engine still serves


def test_client_gone_before_a_non_streamed_answer_frees_the_row(server, engine):
    body = {"model": "beta", "messages": QUESTION, "max_tokens": 450, "temperature": 0}
    cancelled = engine.stats()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    stats = wait_until_idle(engine)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["cancelled"] == cancelled + 1, "the request ran to its end instead of being cancelled"


def test_add_and_remove_adapter_over_http(client, server, engine, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    make_adapter(tiny_model_dir, run_dir / "adapter", seed=21)
    resp = httpx.post(server + "/v1/adapters", json={"name": "epsilon", "path": str(run_dir)})
    assert resp.status_code == 201 and resp.json()["id"] == "epsilon"
    assert "epsilon" in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(model="epsilon", messages=QUESTION, max_tokens=4, temperature=0)
    assert out.choices[0].message.content == greedy(engine, "epsilon", max_tokens=4)[0]
    dup = httpx.post(server + "/v1/adapters", json={"name": "epsilon", "path": str(run_dir)})
    assert dup.status_code == 409 and _error(dup)["param"] == "name"
    bad = httpx.post(server + "/v1/adapters", json={"name": "zeta", "path": str(tmp_path / "missing")})
    assert bad.status_code == 400 and _error(bad)["code"] == "path_not_allowed"
    assert httpx.delete(server + "/v1/adapters/epsilon").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="epsilon", messages=QUESTION, max_tokens=4)
    assert httpx.delete(server + "/v1/adapters/epsilon").status_code == 404


def test_api_key(engine, tmp_path):
    from openai import OpenAI

    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    app = create_app(engine, Settings(home=tmp_path, api_key="s3cret"))
    with live_server(app) as url:
        wrong = OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401
        right = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == engine.base_id
        assert httpx.get(url + "/health").status_code == 200


def test_api_key_from_environment(engine, monkeypatch):
    from tunesmith.serve.app import create_app

    monkeypatch.setenv("TUNESMITH_API_KEY", "from-env")
    with live_server(create_app(engine)) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and json.loads(ok.text)["object"] == "list"
