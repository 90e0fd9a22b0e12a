"""The graders API (POST /v1/fine_tuning/alpha/graders/validate and /run) under hostile
requests on a live loopback server, as issue 19's rules ask of every route: the work of one
request is bounded before it starts, bad input is a 400 whose `param` names the field (never
a 500), a grader that cannot score a sample scores 0 and says why, and a normal chat beside
the hostile request still gets its whole answer."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from serve_helpers import error_of, live_server, normal_chat, post

VALIDATE, RUN = "/v1/fine_tuning/alpha/graders/validate", "/v1/fine_tuning/alpha/graders/run"
CHECK = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "eq"}


def check(**changes) -> dict:
    return {**CHECK, **changes}


def multi(formula: str, **graders) -> dict:
    return {"type": "multi", "name": "m", "calculate_output": formula, "graders": graders or {"a": CHECK}}


def python(source: str) -> dict:
    return {"type": "python", "name": "py", "source": source}


def run(server: str, grader, model_sample="refund", item=None, timeout: float = 120) -> httpx.Response:
    return post(server, RUN, {"grader": grader, "model_sample": model_sample, "item": item or {"label": "refund"}},
                timeout=timeout)


def errors(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()["metadata"]["errors"]


def test_unclosed_templates_are_scanned_in_linear_time(server):
    """The template pattern backtracked: '{{' and 4,000 spaces took 81 s on the event loop,
    which answered nobody meanwhile; 200,000 would have taken days."""
    for text in ("{{" + " " * 200_000, "{{item." + "a" * 200_000, "{{ {{ " * 50_000):
        with normal_chat(server):
            resp = post(server, VALIDATE, {"grader": check(input=text)}, timeout=60)
        assert resp.status_code == 200, resp.text
    resp = run(server, check(input="{{" + " " * 200_000, reference="{{" + " " * 200_000), timeout=60)
    assert resp.json()["reward"] == 1.0  # no template in either: the same text


@pytest.mark.parametrize(("formula", "code_in_message"), [
    ("-" * 1990 + "a", "nested"),               # RecursionError when evaluated: a 500
    ("a" + "+a" * 990, "nested"),               # the same, through a left-deep sum
    ("a * 1e309", "not a finite number"),        # inf: a reward of null
    ("max(a)", "takes 2 to 64"),                 # TypeError when evaluated: a 500
])
def test_a_formula_too_deep_or_not_finite_is_a_400_naming_it(server, formula, code_in_message):
    for body in ({"grader": multi(formula)}, {"grader": multi(formula), "model_sample": "x", "item": {}}):
        with normal_chat(server):
            err = error_of(post(server, RUN if "item" in body else VALIDATE, body), 400)
        assert (err["param"], err["code"]) == ("grader.calculate_output", "invalid_grader")
        assert code_in_message in err["message"]


@pytest.mark.parametrize("formula", [
    "a * 1e308 * 10",          # overflows to inf at run time
    "((9 ^ 999) ^ 999) ^ 999",  # exact integers: a number of a billion digits (hours, gigabytes)
    "floor(a + 8) ^ 999 ^ 2",  # integers again, through floor
    "sqrt(0 - a)",
    "(0 - 8 * a) ^ 0.5",       # a complex number: a TypeError (500)
])
def test_a_formula_that_fails_on_a_sample_scores_zero_with_a_formula_error(server, formula):
    with normal_chat(server):
        resp = run(server, multi(formula), timeout=60)
    flags = errors(resp)
    assert resp.json()["reward"] == 0.0 and flags["formula_parse_error"] is True
    assert resp.json()["sub_rewards"] == {"a": 1.0}


@pytest.mark.parametrize(("body", "param"), [
    ('{"grader": {"type": "text_similarity", "name": "s", "input": "a", "reference": "a", '
     '"evaluation_metric": "bleu", "pass_threshold": NaN}}', "grader.pass_threshold"),
    ('{"grader": {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "x"}], '
     '"range": [0, Infinity]}}', "grader.range[1]"),
    ('{"grader": {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "x"}], '
     '"range": [-1e400, 1]}}', "grader.range[0]"),
])
def test_non_finite_numbers_in_a_grader_are_400s(server, body, param):
    """NaN and Infinity parse (Python's json takes them); /validate answered them as null, a
    grader other than the one sent (and a job stored its grader so)."""
    with normal_chat(server):
        err = error_of(post(server, VALIDATE, body), 400)
    assert (err["param"], err["code"]) == (param, "invalid_grader")


def test_many_graders_labels_and_messages_are_bounded(server):
    many = {f"g{k}": check() for k in range(1000)}  # 1,000 python graders were 1,000 processes one after another
    err = error_of(post(server, VALIDATE, {"grader": multi("g0", **many)}), 400)
    assert (err["param"], err["code"]) == ("grader.graders", "invalid_grader")
    labels = [f"l{k}" for k in range(100_000)]  # passing_labels ⊆ labels was checked in n^2 on the event loop
    judge = {"type": "label_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "x"}],
             "labels": labels, "passing_labels": labels}
    with normal_chat(server):
        err = error_of(post(server, VALIDATE, {"grader": judge}, timeout=60), 400)
    assert (err["param"], err["code"]) == ("grader.labels", "invalid_grader")
    judge = {**judge, "labels": labels[:1000], "passing_labels": labels[:1000]}  # the most a judge's schema takes
    assert post(server, VALIDATE, {"grader": judge}).status_code == 200


@pytest.mark.parametrize(("metric", "words"), [
    ("rouge_l", 20_000),     # a table of 20,000 x 20,000 words in pure Python: minutes (400,000: a day)
    ("fuzzy_match", 60_000),  # over 100,000 characters
])
def test_text_similarity_on_texts_too_long_scores_zero_with_an_error(server, metric, words):
    text = " ".join(["refund"] * words)
    grader = {"type": "text_similarity", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
              "evaluation_metric": metric}
    with normal_chat(server):
        resp = run(server, grader, model_sample=text, item={"label": text}, timeout=60)
    assert resp.json()["reward"] == 0.0 and errors(resp)["other_error"] is True


@pytest.mark.parametrize("source", [
    "def grade(sample, item):\n    return " + "-" * 100_000 + "1\n",     # MemoryError in the parser: a 500
    "def grade(sample, item):\n    return " + "1+" * 100_000 + "1\n",    # RecursionError in ast: a 500
    "def grade(sample, item):\n    return 1\x00\n",
])
def test_python_source_the_parser_cannot_take_is_a_400(server, source):
    with normal_chat(server):
        err = error_of(post(server, VALIDATE, {"grader": python(source)}), 400)
    assert (err["param"], err["code"]) == ("grader.source", "invalid_grader")


def test_python_source_at_the_size_limit_validates_and_one_byte_more_is_refused(server):
    body = "def grade(sample, item):\n    return 1.0\n"
    source = body + "#" * (256 * 1024 - len(body) - 1) + "\n"
    assert post(server, VALIDATE, {"grader": python(source)}).status_code == 200
    err = error_of(post(server, VALIDATE, {"grader": python(source + "#")}), 400)
    assert err["param"] == "grader.source" and "262144" in err["message"]


def test_a_deep_or_odd_sample_or_item_scores_zero_and_says_why(server):
    # model_sample nested 100,000 deep: its JSON parse raised RecursionError (a 500)
    flags = errors(run(server, check(input="{{sample.output_json.a}}"), model_sample="[" * 100_000))
    assert flags["invalid_variable_error"] is True
    # '²' is a digit to str.isdigit but not to int(): a ValueError (a 500)
    flags = errors(run(server, check(reference="{{item.l.²}}"), item={"l": ["refund"]}))
    assert flags["invalid_variable_error"] is True
    flags = errors(run(server, check(reference="{{item.l." + "9" * 5000 + "}}"), item={"l": ["refund"]}))
    assert flags["invalid_variable_error"] is True


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("body", "param"), [
    ({"grader": check(name=_deep(900))}, "grader.name"),
    ({"grader": _deep(900)}, "grader"),
])
def test_deeply_nested_json_is_a_400_naming_where(server, body, param):
    with normal_chat(server):
        err = error_of(post(server, VALIDATE, body), 400)
    assert err["param"] == param
    # an item as deep as the JSON parser goes reaches a python grader and a template whole
    item = {"label": "refund", "a": _deep(900)}
    assert run(server, python("def grade(sample, item):\n    return 1.0\n"), item=item).json()["reward"] == 1.0
    assert run(server, check(input="{{item.a}}"), item=item).json()["reward"] == 0.0


JUDGE = {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "{{sample.output_text}}"}]}


@pytest.mark.parametrize(("body", "param"), [
    ({"grader": JUDGE, "model_sample": "x\ud800"}, "model_sample"),
    ({"grader": JUDGE, "model_sample": "x", "item": {"a": ["\udfff"]}}, "item"),
    ({"grader": {**JUDGE, "name": "j\ud800"}, "model_sample": "x"}, "grader.name"),
    ({"grader": {**JUDGE, "input": [{"role": "user", "content": "\ud800"}]}, "model_sample": "x"}, "grader.input[0].content"),
    ({"grader": python("def grade(s, i):\n    return '\ud800'\n"), "model_sample": "x"}, "grader.source"),
])
def test_lone_surrogates_are_400s_naming_where(server, body, param):
    """JSON's "\\ud800" escape decodes to a string that is not valid Unicode: a judge's request
    could not be encoded (a 500)."""
    with normal_chat(server):
        err = error_of(post(server, RUN, body), 400)  # json.dumps writes the escape, as a hostile client would
    assert err["param"] == param and "lone surrogate" in err["message"]


def test_a_python_grader_that_writes_into_the_protocol_fails_alone(server):
    """The grader's code can write to the pipe its answers travel on: garbage (or 20 MB with no
    end of line, which the server buffered) is the grader's error, not a 500 or the server's memory."""
    for payload in ("b'not json\\n'", "b'x' * 20_000_000", "b'[1, 2]\\n'"):
        source = f"import os\ndef grade(sample, item):\n    os.write(3, {payload})\n    return 1.0\n"
        flags = errors(run(server, python(source), timeout=60))
        assert flags["python_grader_runtime_error"] is True, payload
        assert "protocol" in flags["python_grader_runtime_error_details"]


def test_processes_a_python_grader_starts_end_with_its_run(server, tmp_path):
    """A grader could fork a child that called setsid() and lived on after the run (the
    parent killed only its own child): each run could leave processes behind, for ever."""
    beat = tmp_path / "beat"
    source = ("import os, time\n"
              "def grade(sample, item):\n"
              "    if os.fork() == 0:\n"
              "        os.setsid()\n"
              "        while True:\n"
              "            with open(item['beat'], 'a') as f:\n"
              "                f.write('.')\n"
              "            time.sleep(0.05)\n"
              "    while not os.path.exists(item['beat']):\n"
              "        time.sleep(0.01)\n"
              "    return 1.0\n")
    assert run(server, python(source), item={"beat": str(beat)}).json()["reward"] == 1.0
    size = beat.stat().st_size
    time.sleep(1)  # the child would have beaten ~20 times by now
    assert beat.stat().st_size == size


def test_a_flood_of_grader_runs_is_admitted_in_turn_and_others_are_served(engine, tmp_path):
    """Each python grader run holds a thread and a child process for up to 2 minutes; a
    judge holds a thread while it asks this server, which renders in the same pool. A flood
    took every thread (and could deadlock judges): now at most a few run, a few wait, and the
    rest are told to retry (429), while chats and /health are answered."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.limits import Limits
    from tunesmith.settings import Settings

    limits = Limits(max_running_graders=2, max_waiting_graders=2)
    settings = Settings(home=tmp_path, api_key=None, python_graders=True)
    sleeper = python("import time\ndef grade(sample, item):\n    time.sleep(2)\n    return 1.0\n")
    with live_server(create_app(engine, settings, limits=limits)) as url:
        with normal_chat(url), concurrent.futures.ThreadPoolExecutor(12) as pool:
            flood = [pool.submit(run, url, sleeper) for _ in range(12)]
            assert httpx.get(url + "/health", timeout=60).status_code == 200
            answers = [f.result() for f in flood]
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and 4 <= codes.count(200) < 12, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "server_overloaded"
    assert all(r.json()["reward"] == 1.0 for r in answers if r.status_code == 200)


def test_judges_run_at_once_do_not_wait_for_their_own_chats(engine, tmp_path):
    """A judge's run held a thread of the pool while it asked this server for a chat, whose
    rendering needs a thread of the same pool: as many judges at once as threads, and no chat
    could render, so every judge waited out its timeout (a pool of 4 here stands in for 40)."""
    import anyio

    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    app = create_app(engine, Settings(home=tmp_path, api_key=None))

    @app.post("/test/shrink-thread-pool")
    async def shrink() -> dict:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4
        return {}

    judge = {"type": "score_model", "name": "j", "model": engine.base_id, "sampling_params": {"max_completions_tokens": 4},
             "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    with live_server(app) as url:
        assert httpx.post(url + "/test/shrink-thread-pool").status_code == 200
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: run(url, judge, timeout=60), range(4)))
        assert httpx.get(url + "/health", timeout=60).status_code == 200
    assert [r.status_code for r in answers] == [200] * 4
    assert not any(errors(r)["model_grader_server_error"] for r in answers)


def test_grader_checks_run_one_at_a_time_and_a_flood_of_them_is_refused(engine, tmp_path):
    """Parsing 256 kB of python source takes half a second holding the GIL (a 4 MB body of it,
    7 s): checks ran in the shared pool, 40 at once, starving the event loop and the engine.
    Now one runs at a time, as many wait as grader runs may, the rest are told to retry."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.limits import Limits
    from tunesmith.settings import Settings

    source = "def grade(sample, item):\n    return 1.0\n" + "x = 1\n" * 40_000
    settings = Settings(home=tmp_path, api_key=None, python_graders=True)
    with live_server(create_app(engine, settings, limits=Limits(max_running_graders=1, max_waiting_graders=1))) as url:
        with normal_chat(url), concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(url, VALIDATE, {"grader": python(source)}), range(8)))
    codes = [r.status_code for r in answers]
    assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes


def test_the_python_graders_of_a_run_share_one_time_budget(engine, tmp_path):
    """Each python grader had 2 minutes: a multi of 32 that spin held a thread and a core for
    64 minutes. Now a run's python graders share one budget (OpenAI's 2 minutes; 1 s here)."""
    from tunesmith.serve.app import create_app
    from tunesmith.serve.limits import Limits
    from tunesmith.settings import Settings

    spin = python("def grade(sample, item):\n    while True:\n        pass\n")
    graders = {f"p{k}": spin for k in range(8)}
    settings = Settings(home=tmp_path, api_key=None, python_graders=True)
    with live_server(create_app(engine, settings, limits=Limits(grader_run_s=1.0))) as url:
        with normal_chat(url):
            resp = run(url, multi("p0", **graders), timeout=60)
    flags = errors(resp)
    assert resp.json()["reward"] == 0.0 and flags["python_grader_runtime_error"] is True
    assert flags["unresponsive_reward_error"] is True  # the later graders were not started


def test_what_held(server):
    """Attacks that were already answered well, kept so that they stay so."""
    # a 5 MB body (a 10 MB calculate_output cannot arrive at all)
    err = error_of(post(server, VALIDATE, {"grader": multi("a" * 5_000_000)}), 413)
    assert err["code"] == "request_too_large"
    err = error_of(post(server, VALIDATE, {"grader": multi("a" * 2001)}), 400)
    assert err["param"] == "grader.calculate_output"
    # a body nested 10,000 deep (and a multi inside a multi: one level only)
    deep = '{"grader": ' + '{"type": "multi", "graders": {"a": ' * 10_000 + "1" + "}}" * 10_000 + "}"
    assert error_of(post(server, VALIDATE, deep), 400)["code"] in ("invalid_json", "invalid_body")
    err = error_of(post(server, VALIDATE, {"grader": multi("a", a=multi("b"))}), 400)
    assert err["param"].startswith("grader.graders.a")
    # wrong types at every level
    for grader, param in ((1, "grader"), ({"type": 1}, "grader.type"), (check(operation=["eq"]), "grader.operation"),
                          (multi("a", a=check(input={"x": 1})), "grader.graders.a.input")):
        err = error_of(post(server, VALIDATE, {"grader": grader}), 400)
        assert err["param"] == param, (grader, err)
    # templates are not rendered twice: an item value holding a template stays text
    resp = run(server, check(input="{{item.a}}", reference="{{item.b}}"), item={"a": "{{item.b}}", "b": "{{item.a}}"})
    assert resp.json()["reward"] == 0.0 and not errors(resp)["invalid_variable_error"]
    # a huge power of a number is refused while the formula runs
    assert errors(run(server, multi("2 ^ 100000")))["formula_parse_error"] is True
