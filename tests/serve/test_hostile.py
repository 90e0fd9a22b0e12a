"""Issue 19: hostile requests on a live loopback server. Each test sends the hostile request
while a normal streamed chat is in flight, and checks the status, the error's param and
code, and that the normal chat still gets its whole answer."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from serve_helpers import NORMAL, error_of, live_server, normal_chat, post, wait_until_idle

from tunesmith.generate.engine import SamplingParams


def chat_body(engine, **extra) -> dict:
    return {"model": engine.base_id, "messages": NORMAL, "max_tokens": 4, **extra}


def test_a_near_zero_temperature_samples_greedily_and_fails_no_one(server, engine):
    with normal_chat(server):
        resp = post(server, "/v1/chat/completions", chat_body(engine, temperature=1e-300, n=2, max_tokens=6))
    assert resp.status_code == 200, resp.text
    greedy = post(server, "/v1/chat/completions", chat_body(engine, temperature=0, max_tokens=6)).json()
    answers = [c["message"]["content"] for c in resp.json()["choices"]]
    assert answers == [greedy["choices"][0]["message"]["content"]] * 2


def test_a_bad_temperature_is_a_400_naming_it(server, engine):
    with normal_chat(server):
        err = error_of(post(server, "/v1/chat/completions", '{"model": "x", "messages": [], "temperature": NaN}'), 400)
    assert err["param"] in ("messages", "temperature") and err["code"] == "invalid_parameter"
    err = error_of(post(server, "/v1/chat/completions", chat_body(engine, temperature=float("inf"))), 400)
    assert err["param"] == "temperature"


def test_a_row_whose_sampling_fails_fails_alone(engine):
    """A row whose sampling raises gets "error"; the other rows of the same step finish
    normally. (HTTP validation lets no bad parameter through; a temperature that raises
    when compared stands in for whatever bug might.)"""

    class ExplodingTemperature(float):
        def __ge__(self, other):
            raise RuntimeError("a bug in sampling")

    import queue

    events: queue.Queue = queue.Queue()
    ids = engine.render_chat(NORMAL)
    bad = SamplingParams(8, ExplodingTemperature(1.0))
    with engine._model_lock:  # both rows join the same step
        engine.submit(ids, "alpha", SamplingParams(8, 0.0), lambda ev: events.put(("good", ev)))
        engine.submit(ids, "alpha", bad, lambda ev: events.put(("bad", ev)))
    ends = {}
    while len(ends) < 2:
        who, ev = events.get(timeout=60)
        if ev.finish_reason:
            ends[who] = ev.finish_reason
    assert ends == {"good": "length", "bad": "error"}


def test_many_short_messages_render_quickly_and_off_the_event_loop(server, engine):
    messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"m{k}"} for k in range(2001)]
    health: list[int] = []

    def poll_health() -> None:
        health.append(httpx.get(server + "/health", timeout=30).status_code)

    with normal_chat(server):
        poller = threading.Thread(target=poll_health)
        poller.start()
        resp = post(server, "/v1/chat/completions", {"model": engine.base_id, "messages": messages, "max_tokens": 1})
        poller.join()
    # 2,001 messages are ~15k tokens, far over the tiny model's 512: refused by the floor of the
    # tokens each message's template wraps it in, before rendering (that rendering is linear is
    # tests/data/test_render.py's; that it runs in a worker thread, app.py's run_in_threadpool)
    err = error_of(resp, 400)
    assert err["code"] == "context_length_exceeded" and health == [200]
    too_many = [{"role": "user", "content": "x"}] * 2049
    with normal_chat(server):
        err = error_of(post(server, "/v1/chat/completions", {"model": engine.base_id, "messages": too_many}), 400)
    assert (err["param"], err["code"]) == ("messages", "too_many_messages")


def test_prompts_and_prompts_times_n_are_bounded(server, engine):
    with normal_chat(server):
        err = error_of(post(server, "/v1/completions", {"model": engine.base_id, "prompt": ["a"] * 4096, "n": 8}), 400)
        assert (err["param"], err["code"]) == ("prompt", "too_many_prompts")
        err = error_of(post(server, "/v1/completions", {"model": engine.base_id, "prompt": ["a"] * 64, "n": 8}), 400)
        assert (err["param"], err["code"]) == ("n", "too_many_choices")


def test_text_too_long_for_the_context_is_refused_before_rendering(server, engine):
    long = "a" * (engine.max_context * 32 + 1)
    with normal_chat(server):
        err = error_of(post(server, "/v1/chat/completions",
                            {"model": engine.base_id, "messages": [{"role": "user", "content": long}]}), 400)
        assert (err["param"], err["code"]) == ("messages", "context_length_exceeded")
        err = error_of(post(server, "/v1/completions", {"model": engine.base_id, "prompt": long}), 400)
        assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_schema_size_and_depth_are_bounded(server, engine):
    messages = [{"role": "user", "content": "Answer in JSON."}]
    with normal_chat(server):
        err = error_of(post(server, "/v1/chat/completions", {"model": engine.base_id, "messages": messages,
                                                            "response_format": _json_schema(_nested(300))}), 400)
        assert (err["param"], err["code"]) == ("response_format.json_schema.schema", "schema_too_deep")
        huge = {"type": "string", "enum": [f"v{k}" for k in range(100_001)]}
        err = error_of(post(server, "/v1/chat/completions", {"model": engine.base_id, "messages": messages,
                                                            "response_format": _json_schema(huge)}), 400)
        assert (err["param"], err["code"]) == ("response_format.json_schema.schema", "schema_too_large")


def test_openai_sized_schemas_pass_the_size_check():
    """OpenAI's documented limits (5,000 properties, 10 levels, 1,000 enum values of 15,000
    characters in all) fit inside ours."""
    from tunesmith.serve.limits import Limits, check_schema

    wide = {"type": "object", "properties": {f"p{k}": {"type": "string", "description": "d"} for k in range(4000)}}
    wide["properties"]["deep"] = _nested(9)
    wide["properties"]["choice"] = {"type": "string", "enum": ["x" * 15 for _ in range(1000)]}
    check_schema(wide, Limits())


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "caf\ud800"}]}, "messages[0].content"),
    ({"model": "base\udfff"}, "model"),
    ({"seed": 2**70}, "seed"),
])
def test_invalid_unicode_and_huge_seeds_are_400s(server, engine, body, param):
    payload = {**chat_body(engine), **body}
    with normal_chat(server):
        # json.dumps writes the lone surrogate as its \ud800 escape, as a hostile client would
        err = error_of(post(server, "/v1/chat/completions", payload), 400)
    assert (err["param"], err["code"]) == (param, "invalid_parameter")


@pytest.mark.parametrize("body, says", [
    ('{"model": "x", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than about 1,000 levels"),
    ('{"model": "x", "messages": [], "seed": 1' + "0" * 5000 + "}", "a number has more than 4,300 digits"),
], ids=["100,000-deep nesting", "a 5,001-digit number"])
def test_bodies_the_parser_refuses_are_400s(server, engine, body, says):
    """The JSON parser refuses both before pydantic sees them: no parameter to name, and the
    message says which (it was FastAPI's "There was an error parsing the body")."""
    with normal_chat(server):
        err = error_of(post(server, "/v1/chat/completions", body), 400)
    assert (err["param"], err["code"]) == (None, "invalid_body"), err
    assert says in err["message"], err


@pytest.fixture(scope="module")
def keyed_server(engine, tmp_path_factory):
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    with live_server(create_app(engine, Settings(home=tmp_path_factory.mktemp("home"), api_key="k"))) as url:
        yield url


def test_the_key_is_checked_before_the_body_and_on_the_schema(keyed_server):
    with normal_chat(keyed_server, api_key="k"):
        err = error_of(post(keyed_server, "/v1/chat/completions", "{not json"), 401)
    assert err["code"] == "invalid_api_key"
    assert httpx.get(keyed_server + "/openapi.json").status_code == 401
    assert httpx.get(keyed_server + "/openapi.json", headers={"Authorization": "Bearer k"}).status_code == 200
    assert httpx.get(keyed_server + "/health").status_code == 200


@pytest.fixture(scope="module")
def small_engine(tiny_model_dir):
    """An engine that decodes one row at a time and lets two rows wait."""
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.models.inference import load_for_inference

    eng = LocalEngine(load_for_inference(str(tiny_model_dir)), max_batch_rows=1, max_waiting_rows=2)
    yield eng
    eng.close()


def test_a_full_queue_is_a_429_with_retry_after(small_engine, tmp_path):
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    ids = small_engine.render_chat(NORMAL)
    handles = []

    def wait_for_waiting(rows: int) -> None:
        while small_engine.stats()["waiting"] != rows:
            time.sleep(0.01)

    with live_server(create_app(small_engine, Settings(home=tmp_path, api_key=None))) as url:
        step = small_engine._model_lock
        step.acquire()  # hold the step: what is queued stays queued
        try:
            handles.append(small_engine.submit(ids, small_engine.base_id, SamplingParams(4, 0.0), lambda ev: None))
            wait_for_waiting(0)  # the first row is taken into the held step
            with normal_chat(url, model=small_engine.base_id):  # queued before the queue is full: answered
                wait_for_waiting(1)
                handles.append(small_engine.submit(ids, small_engine.base_id, SamplingParams(4, 0.0),
                                                   lambda ev: None))
                resp = post(url, "/v1/chat/completions", chat_body(small_engine))
                err = error_of(resp, 429)
                assert err["code"] == "server_overloaded" and resp.headers["retry-after"] == "1"
                for h in handles:
                    h.cancel()
                step.release()
                step = None
        finally:
            if step is not None:
                step.release()
        wait_until_idle(small_engine)


def test_admission_takes_turns_between_requests(small_engine):
    """Six rows of one request queued before one row of another: the small request is
    admitted after the first big row, not after all six."""
    import queue

    ends: queue.Queue = queue.Queue()
    ids = small_engine.render_chat(NORMAL)
    big, small = object(), object()
    eng = small_engine
    eng._max_waiting = 100
    try:
        with eng._model_lock:
            for k in range(6):
                eng.submit(ids, eng.base_id, SamplingParams(3, 0.0),
                           lambda ev, k=k: ev.finish_reason and ends.put(f"big{k}"), group=big)
            eng.submit(ids, eng.base_id, SamplingParams(3, 0.0), lambda ev: ev.finish_reason and ends.put("small"),
                       group=small)
        order = [ends.get(timeout=60) for _ in range(7)]
    finally:
        eng._max_waiting = 2
    assert order.index("small") <= 2, order


def test_the_engine_step_holds_to_its_token_budget_not_a_row_count(tiny_model_dir, tmp_path):
    """Issue 19: MAX_BATCH_ROWS counted rows, so 32 long prompts could take the memory of 32
    full contexts. With a budget of three rows' prompt + max_tokens, a request of eight long
    prompts is decoded at most three rows at a time, and a chat sent beside it is answered."""
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.models.inference import load_for_inference
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    eng = LocalEngine(load_for_inference(str(tiny_model_dir)), max_batch_rows=32)
    long = " ".join(f"w{k}" for k in range(50))
    width = len(eng.encode(long)) + 8  # one row's prompt + max_tokens: what the budget counts
    eng._max_tokens = 3 * width
    try:
        with live_server(create_app(eng, Settings(home=tmp_path, api_key=None))) as url:
            with normal_chat(url, model=eng.base_id):
                resp = post(url, "/v1/completions", {"model": eng.base_id, "prompt": [long] * 8, "max_tokens": 8,
                                                     "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert [c["finish_reason"] for c in resp.json()["choices"]] == ["length"] * 8
        assert 2 <= eng.stats()["peak_rows"] <= 3
    finally:
        eng.close()


def test_a_big_request_over_http_takes_turns_with_a_small_one(small_engine, tmp_path):
    """Issue 19's starvation, as a client sends it: a request of 64 prompts x n=2 (the most one
    may ask) queued first, a chat after it; the engine decodes one row at a time. The chat is
    admitted after at most one of the big request's rows, so it is answered first."""
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    eng = small_engine
    ends: list[str] = []

    def send(name: str, path: str, body: dict) -> threading.Thread:
        def run() -> None:
            resp = post(url, path, {"model": eng.base_id, "max_tokens": 2, "temperature": 0, **body})
            ends.append(f"{name} {resp.status_code}")
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def wait_for_waiting(rows: int) -> None:
        while eng.stats()["waiting"] < rows:
            time.sleep(0.01)

    eng._max_waiting = 200
    try:
        with live_server(create_app(eng, Settings(home=tmp_path, api_key=None))) as url:
            with eng._model_lock:  # hold the step: both requests queue before either runs
                big = send("big", "/v1/completions", {"prompt": ["a b"] * 64, "n": 2})
                wait_for_waiting(127)  # the scheduler holds the first row, waiting for the step
                small = send("chat", "/v1/chat/completions", {"messages": NORMAL})
                wait_for_waiting(128)
            big.join(timeout=120)
            small.join(timeout=120)
    finally:
        eng._max_waiting = 2
    assert ends == ["chat 200", "big 200"], ends


def test_a_request_holding_the_whole_batch_gives_rows_back_when_another_arrives(tiny_model_dir, tmp_path):
    """A big request admitted alone takes every row of the step; a chat arriving after it
    used to wait for those rows to end (up to max_tokens steps of the big batch). Now the big
    request keeps its fair share (8 rows over 2 requests: 4), gives the other 4 back at the
    next step, and they resume later from their answer so far: the chat is answered first,
    and the big request's answers are the ones it gets alone."""
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.models.inference import load_for_inference
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    eng = LocalEngine(load_for_inference(str(tiny_model_dir)), precision="fp32", max_batch_rows=8)
    big = {"model": eng.base_id, "prompt": ["a b", "c d e", "f", "g h i j"], "n": 2, "max_tokens": 32,
           "temperature": 0}
    ends: list[str] = []
    answers: dict[str, httpx.Response] = {}

    def send(name: str, path: str, body: dict) -> threading.Thread:
        def run() -> None:
            answers[name] = post(url, path, body)
            ends.append(name)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        with live_server(create_app(eng, Settings(home=tmp_path, api_key=None))) as url:
            with eng._model_lock:  # hold the first step: the big request is admitted whole, then the chat arrives
                big_thread = send("big", "/v1/completions", big)
                while eng.stats()["waiting"] or not big_thread.is_alive():
                    time.sleep(0.01)
                time.sleep(0.2)  # the engine took all 8 rows and waits for the step
                assert eng.stats()["waiting"] == 0
                chat = send("chat", "/v1/chat/completions",
                            {"model": eng.base_id, "messages": NORMAL, "max_tokens": 2, "temperature": 0})
                while eng.stats()["waiting"] < 1:
                    time.sleep(0.01)
            chat.join(timeout=120)
            big_thread.join(timeout=120)
            preempted = eng.stats()["preempted"]
            alone = post(url, "/v1/completions", big)
    finally:
        eng.close()
    assert answers["chat"].status_code == 200 and answers["big"].status_code == 200, answers
    assert preempted == 4  # the big request kept its share of 8 rows over 2 requests
    assert ends == ["chat", "big"]
    texts = lambda r: [(c["index"], c["text"], c["finish_reason"]) for c in r.json()["choices"]]  # noqa: E731
    assert texts(answers["big"]) == texts(alone)  # the preempted rows resumed where they were
    assert sum(c[2] == "length" for c in texts(alone)) >= 4  # long answers: they outlasted the chat


@pytest.fixture(scope="module")
def confined_server(engine, tmp_path_factory):
    """A server whose clients may name paths only under its home."""
    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    home = tmp_path_factory.mktemp("confined-home")
    with live_server(create_app(engine, Settings(home=home, api_key=None))) as url:
        yield url, home


def test_adapter_paths_are_confined_with_one_message_for_missing_or_not_allowed(confined_server, adapter_dirs):
    url, home = confined_server
    (home / "escape").symlink_to(adapter_dirs["alpha"], target_is_directory=True)
    messages = []
    with normal_chat(url):
        for path in (str(adapter_dirs["alpha"]), str(home / "escape"), str(home / "missing"), str(home / ".." / ".."),
                     "/etc"):
            err = error_of(post(url, "/v1/adapters", {"name": "intruder", "path": path}), 400)
            assert (err["param"], err["code"]) == ("path", "path_not_allowed")
            messages.append(err["message"].replace(path, "PATH"))
    assert len(set(messages)) == 1


def test_the_ft_namespace_is_reserved_for_jobs(confined_server, adapter_dirs):
    url, home = confined_server
    shutil.copytree(adapter_dirs["alpha"], home / "mine")
    with normal_chat(url):
        err = error_of(post(url, "/v1/adapters", {"name": "ft:base:team:ftjob-1", "path": str(home / "mine")}), 400)
    assert (err["param"], err["code"]) == ("name", "reserved_name")


@pytest.mark.parametrize("change, words", [
    (lambda d: _edit_config(d, r=10**9), "rank"),
    (lambda d: (d / "tunesmith_adapter.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}"),
     "not a readable safetensors"),
])
def test_adapter_files_are_checked_before_any_allocation(confined_server, adapter_dirs, change, words):
    url, home = confined_server
    target = home / ("bad-" + words.replace(" ", "-"))
    shutil.copytree(adapter_dirs["alpha"], target)
    change(target)
    with normal_chat(url):
        err = error_of(post(url, "/v1/adapters", {"name": "bad", "path": str(target)}), 400)
    assert (err["param"], err["code"]) == ("path", "invalid_adapter")
    assert words in err["message"]


def test_clients_load_at_most_max_adapters(engine, adapter_dirs, tmp_path):
    """Each adapter a client loads holds memory until deleted: past --max-adapters (the
    `ft:` models jobs publish aside) a load is refused, and a DELETE makes room."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.limits import Limits
    from tunesmith.settings import Settings

    shutil.copytree(adapter_dirs["alpha"], tmp_path / "mine")
    named = sum(1 for c in engine.models() if c.parent and not c.id.startswith("ft:"))
    app = create_app(engine, Settings(home=tmp_path, api_key=None), limits=Limits(max_adapters=named + 1))
    with live_server(app) as url:
        try:
            assert post(url, "/v1/adapters", {"name": "one", "path": str(tmp_path / "mine")}).status_code == 201
            with normal_chat(url):
                err = error_of(post(url, "/v1/adapters", {"name": "two", "path": str(tmp_path / "mine")}), 400)
            assert (err["param"], err["code"]) == ("name", "too_many_adapters")
            assert "DELETE" in err["message"] and "two" not in {c.id for c in engine.models()}
            assert httpx.delete(url + "/v1/adapters/one").status_code == 200
            assert post(url, "/v1/adapters", {"name": "two", "path": str(tmp_path / "mine")}).status_code == 201
        finally:
            for name in ("one", "two"):
                if name in {c.id for c in engine.models()}:
                    engine.remove_adapter(name)


def _edit_config(adapter_dir, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_job_model_path_outside_the_roots_is_refused(engine, _isolated_home):
    from tunesmith.jobs.store import open_store
    from tunesmith.serve.app import create_app
    from tunesmith.serve.jobs_api import JobsService
    from tunesmith.settings import Settings

    service = JobsService(open_store(), workers=0)
    with live_server(create_app(engine, Settings(home=_isolated_home, api_key=None), routers=[service.router])) as url:
        with normal_chat(url):
            for model in ("/etc", str(_isolated_home / "nothing-here")):
                err = error_of(post(url, "/v1/fine_tuning/jobs", {"model": model, "training_file": "file-x"}), 400)
                assert (err["param"], err["code"]) == ("model", "path_not_allowed")


def test_a_name_with_dots_is_served(confined_server, engine, adapter_dirs):
    url, home = confined_server
    shutil.copytree(adapter_dirs["beta"], home / "dotted")
    with normal_chat(url):
        resp = post(url, "/v1/adapters", {"name": "ft:Qwen2.5-0.5B-Instruct:v1.2:abc", "path": str(home / "dotted")})
        assert resp.status_code == 400  # ft: is the publisher's; the engine takes the name itself:
    engine.add_adapter("ft:Qwen2.5-0.5B-Instruct:v1.2:abc", home / "dotted")
    try:
        with normal_chat(url):
            answer = post(url, "/v1/chat/completions", {"model": "ft:Qwen2.5-0.5B-Instruct:v1.2:abc",
                                                        "messages": NORMAL, "max_tokens": 6, "temperature": 0})
        beta = post(url, "/v1/chat/completions", {"model": "beta", "messages": NORMAL, "max_tokens": 6,
                                                  "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == beta.json()["choices"][0]["message"]["content"]
    finally:
        engine.remove_adapter("ft:Qwen2.5-0.5B-Instruct:v1.2:abc")


def test_a_job_whose_model_name_could_not_be_served_is_refused_at_creation(engine, _isolated_home, tiny_model_dir):
    from tunesmith.jobs.store import open_store
    from tunesmith.serve.app import create_app
    from tunesmith.serve.jobs_api import JobsService
    from tunesmith.settings import Settings

    shutil.copytree(tiny_model_dir, _isolated_home / "tiny model")
    service = JobsService(open_store(), workers=0)
    with live_server(create_app(engine, Settings(home=_isolated_home, api_key=None), routers=[service.router])) as url:
        with normal_chat(url):
            err = error_of(post(url, "/v1/fine_tuning/jobs", {"model": str(_isolated_home / "tiny model"),
                                                              "training_file": "file-x"}), 400)
    assert (err["param"], err["code"]) == ("model", "invalid_model_name")


@pytest.fixture(scope="module")
def files_server(engine, tmp_path_factory):
    """The inference API and the files API (1 MB upload limit) on one loopback server."""
    from tunesmith.jobs.store import open_store
    from tunesmith.serve.app import create_app
    from tunesmith.serve.jobs_api import JobsService
    from tunesmith.settings import Settings

    home = tmp_path_factory.mktemp("files-home")
    service = JobsService(open_store(f"sqlite:///{home / 'jobs.db'}"), workers=0, max_upload_bytes=1_000_000)
    with live_server(create_app(engine, Settings(home=home, api_key=None), routers=[service.router])) as url:
        service.url = url
        yield service


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "bnd") -> bytes:
    out = b""
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _upload(url: str, body: bytes, chunked: bool = False) -> httpx.Response:
    # chunked: no Content-Length, so only the count while streaming can stop it
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    return httpx.post(url + "/v1/files", content=content, timeout=120,
                      headers={"content-type": "multipart/form-data; boundary=bnd"})


def test_every_form_field_counts_toward_the_upload_limit(files_server):
    files_server = files_server.url
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    fields = [(f"field{k}", b"x" * 60_000, None) for k in range(40)]  # 2.4 MB of fields, 1 MB limit
    body = _multipart([("purpose", b"fine-tune", None), *fields, ("file", good.encode(), "t.jsonl")])
    with normal_chat(files_server):
        resp = _upload(files_server, body, chunked=True)
        assert error_of(_upload(files_server, body), 413)["code"] == "file_too_large"  # as declared
    err = error_of(resp, 413)
    assert (err["param"], err["code"]) == ("file", "file_too_large")


def test_a_hostile_upload_line_is_a_line_error_not_a_500(files_server):
    files_server = files_server.url
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    lines = [good, '{"messages": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000, good]
    body = _multipart([("purpose", b"fine-tune", None), ("file", "\n".join(lines).encode(), "t.jsonl")])
    with normal_chat(files_server):
        resp = _upload(files_server, body)
    assert resp.status_code == 200, resp.text
    report = httpx.get(files_server + f"/v1/files/{resp.json()['id']}/validation").json()
    assert {(e["line"], e["code"]) for e in report["errors"]} == {(2, "invalid_json"), (3, "invalid_json")}


def test_a_lone_surrogate_in_an_upload_line_is_a_line_error_in_the_validation_through_a_model(files_server,
                                                                                            tiny_model_dir):
    """json.loads takes "\\ud800" and the tokenizer raised a TypeError on it: the report
    through a model was a 500 (and a job on the file failed as an internal error)."""
    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    lone = '{"messages": [{"role": "user", "content": "caf\\ud800"}, {"role": "assistant", "content": "yo"}]}'
    body = _multipart([("purpose", b"fine-tune", None), ("file", "\n".join([good] * 11 + [lone]).encode(), "t.jsonl")])
    resp = _upload(service.url, body)
    assert resp.status_code == 200, resp.text
    url = service.url + f"/v1/files/{resp.json()['id']}/validation"
    assert [(e["line"], e["code"]) for e in httpx.get(url).json()["errors"]] == [(12, "invalid_json")]
    with normal_chat(service.url):
        report = httpx.get(url, params={"model": str(tiny_model_dir)}, timeout=120)
    assert report.status_code == 200, report.text
    assert report.json()["ok"] is False and report.json()["examples"] == 11
    assert [(e["line"], e["code"]) for e in report.json()["errors"]] == [(12, "invalid_json")]


def test_a_file_is_checked_through_a_model_in_a_process_of_its_own_at_a_lower_priority(files_server,
                                                                                        tiny_model_dir):
    """Rendering and tokenizing a 1 MB line took 0.8 s of a core in the server's process,
    holding the GIL up to 70 ms at a time, and made the chats beside a stream of such checks
    2.3 times slower (issue 19's load run). The check now runs in a child process at nice
    CHECK_NICE (10), and its report is the same."""
    import os

    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    line = json.dumps({"messages": [{"role": "user", "content": "a " * 50_000}, {"role": "assistant", "content": "b"}]})
    body = _multipart([("purpose", b"fine-tune", None), ("file", "\n".join([line] + [GOOD_LINE] * 11).encode(), "t.jsonl")])
    url = service.url + f"/v1/files/{_upload(service.url, body).json()['id']}/validation"
    with normal_chat(service.url):
        report = httpx.get(url, params={"model": str(tiny_model_dir)}, timeout=120)
    assert report.status_code == 200, report.text
    problems = [(p["line"], p["code"]) for p in report.json()["errors"] + report.json()["warnings"]]
    assert report.json()["examples"] == 11 and (1, "too_long") in problems, problems  # rendered and counted
    pids = list(service._checker._processes)
    assert pids and os.getpid() not in pids
    from tunesmith.serve.jobs_api import CHECK_NICE

    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [os.getpriority(os.PRIO_PROCESS, 0) + CHECK_NICE]


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


def _job_held_by_a_worker(service, model: str) -> str:
    """A job created over HTTP, then running under worker "w1" (as a live worker holds it)."""
    body = _multipart([("purpose", b"fine-tune", None), ("file", ("\n".join([GOOD_LINE] * 12)).encode(), "t.jsonl")])
    file_id = _upload(service.url, body).json()["id"]
    job = post(service.url, "/v1/fine_tuning/jobs", {"model": model, "training_file": file_id}).json()
    claimed = service.store.claim_job("w1", lease_s=60)
    assert claimed["id"] == job["id"]
    service.store.transition(job["id"], ["validating_files"], "running", "Fine-tuning job started")
    return job["id"]


def test_pause_then_resume_before_the_worker_looks_does_not_run_the_job_twice(files_server, tiny_model_dir):
    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    job_id = _job_held_by_a_worker(service, str(tiny_model_dir))
    with normal_chat(service.url):
        assert post(service.url, f"/v1/fine_tuning/jobs/{job_id}/pause", {}).json()["status"] == "paused"
        resumed = post(service.url, f"/v1/fine_tuning/jobs/{job_id}/resume", {}).json()
    # Its worker, heartbeating next, finds it running and goes on; no other worker can claim it.
    assert resumed["status"] == "running"
    assert service.store.heartbeat(job_id, "w1") == "running"
    assert service.store.claim_job("w2", lease_s=60) is None
    service.store.transition(job_id, ["running"], "cancelled", "Job cancelled")


def test_a_model_published_for_a_job_cancelled_before_it_succeeded_is_withdrawn(files_server, tiny_model_dir,
                                                                                adapter_dirs, engine):
    """The worker publishes before marking the job succeeded (so the model answers as soon as
    the job says so); a cancel in between must not leave the cancelled job's model served."""
    from tunesmith.jobs.worker import Worker

    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    job_id = _job_held_by_a_worker(service, str(tiny_model_dir))
    publisher = service.publisher
    publisher.engine = engine
    name = f"ft:tiny::{job_id}"
    worker = Worker(service.store, worker_id="w1", on_model_ready=publisher.publish, on_model_gone=publisher.unpublish)
    with normal_chat(service.url):
        publisher.publish(name, adapter_dirs["gamma"])  # what _finish does first ...
        assert name in [m["id"] for m in httpx.get(service.url + "/v1/models").json()["data"]]
        assert post(service.url, f"/v1/fine_tuning/jobs/{job_id}/cancel", {}).json()["status"] == "cancelled"
        _, done = service.store.transition(job_id, ["running"], "succeeded", "done")  # ... then this, too late
        assert not done
        worker.on_model_gone(name)  # what _finish does when the transition did not happen
    assert name not in [m["id"] for m in httpx.get(service.url + "/v1/models").json()["data"]]


def test_a_worker_renews_its_lease_while_it_validates_so_no_other_worker_takes_the_job(files_server, tiny_model_dir):
    """Validating a file through a model can outlast the lease; before, no heartbeat was sent
    meanwhile, and another worker claimed the job and validated (then trained) it a second
    time. A rival worker tries to claim the job all along, as another machine's would."""
    from tunesmith.jobs.worker import Worker, WorkerConfig

    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {k} " * 5},
                                      {"role": "assistant", "content": f"answer {k}"}]}) for k in range(2000)]
    body = _multipart([("purpose", b"fine-tune", None), ("file", "\n".join(lines).encode(), "t.jsonl")])
    file_id = _upload(service.url, body).json()["id"]
    job_id = post(service.url, "/v1/fine_tuning/jobs", {"model": str(tiny_model_dir), "training_file": file_id}).json()["id"]
    # Checking 2,000 lines takes about 4 leases (6 s on a quiet 2-core machine); the lease is 30
    # poll intervals long, so a loaded machine (CI) that delays one renewal still keeps it.
    lease_s = 1.5
    worker = Worker(service.store, WorkerConfig(poll_interval_s=0.05, lease_s=lease_s), worker_id="w1",
                    log=lambda msg: None)
    rival_claims, heartbeats = [], set()

    def rival() -> None:
        """Another worker, polling while w1 validates the job (before w1 claims it, and once it
        is validated and queued, the job is anyone's)."""
        while (job := service.store.get_job(job_id))["worker_id"] != "w1":
            time.sleep(0.01)
        while job["status"] == "validating_files":
            heartbeats.add(job["heartbeat_at"])
            service.store.requeue_lapsed(lease_s)
            claimed = service.store.claim_job("w2", lease_s)
            if claimed is not None:  # (the job as it was before the claim)
                # Taken while still being validated is the bug; taken once w1 queued it (between
                # this loop's read of the status and its claim) is the job being anyone's.
                if claimed["status"] == "validating_files":
                    rival_claims.append(claimed["id"])
                service.store.release(claimed["id"], "w2")
            time.sleep(0.05)
            job = service.store.get_job(job_id)

    watcher = threading.Thread(target=rival)
    watcher.start()
    with normal_chat(service.url):
        assert worker.run_once()  # claims the job and validates its file
    watcher.join(timeout=60)
    assert rival_claims == []
    assert len(heartbeats) >= 3  # the lease was renewed while the file was checked, many leases long
    job = httpx.get(service.url + f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued", job
    events = [e["message"] for e in httpx.get(service.url + f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert not any("heartbeat" in m for m in events), events
    service.store.transition(job_id, ["queued"], "cancelled", "Job cancelled")


def test_a_flood_of_model_based_file_checks_takes_no_thread_chats_need(files_server, tiny_model_dir):
    """GET /v1/files/{id}/validation?model= checks one file at a time. The checks waiting their
    turn each held one of the threads chats render in, so 45 of them starved every chat until
    they were done; now they wait without a thread, 16 at most, the rest a 429."""
    from collections import Counter

    service = files_server
    service.path_roots = (*service.path_roots, tiny_model_dir.parent)
    body = _multipart([("purpose", b"fine-tune", None), ("file", "\n".join([GOOD_LINE] * 12).encode(), "t.jsonl")])
    url = service.url + f"/v1/files/{_upload(service.url, body).json()['id']}/validation"
    answers: list[httpx.Response] = []

    def check() -> None:
        answers.append(httpx.get(url, params={"model": str(tiny_model_dir)}, timeout=300))

    flood = [threading.Thread(target=check) for _ in range(45)]
    with service._validation_lock:  # the first check holds its turn until the chat is answered
        for t in flood:
            t.start()
        give_up = time.monotonic() + 60  # (before, none was answered: the chat below then fails)
        while len(answers) < 45 - 17 and time.monotonic() < give_up:  # 1 checking, 16 waiting, the rest answered
            time.sleep(0.05)
        with normal_chat(service.url):
            pass
    for t in flood:
        t.join()
    assert Counter(r.status_code for r in answers) == {200: 17, 429: 28}
    refused = next(r for r in answers if r.status_code == 429)
    assert error_of(refused, 429)["code"] == "server_overloaded" and refused.headers["retry-after"] == "2"
