"""The jobs API's newer parts under hostile requests on a live loopback server (issue 19's
rules): reinforcement jobs' graders and hyperparameters, `integrations`, GET /v1/sweeps/{name}
and the jobs-only app's body limit. Bad input is a 400 naming the param, never a 500; no
request leaves behind a job that breaks the listing; others keep being answered."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from jobs_helpers import jobs_server, upload, write_chat_jsonl  # noqa: F401 (jobs_server is a fixture)

JOBS = "/v1/fine_tuning/jobs"
CHECK = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "eq"}


def post(url: str, path: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def rft(grader, **hyperparameters) -> dict:
    method = {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyperparameters}}
    return {"model": "smollm2-135m-instruct", "training_file": "file-none", "method": method}


@pytest.fixture
def live(jobs_server):  # noqa: F811
    return jobs_server(workers=0)


@pytest.mark.parametrize(("body", "param"), [
    # NaN/Infinity parse; stored with the job, they made every later GET /v1/fine_tuning/jobs a 500
    (json.dumps(rft({**CHECK, "type": "text_similarity", "evaluation_metric": "bleu", "operation": None}))
     .replace('"operation": null', '"pass_threshold": Infinity'), "method.reinforcement.grader.pass_threshold"),
    (rft({"type": "multi", "name": "m", "calculate_output": "g0",
          "graders": {f"g{k}": CHECK for k in range(1000)}}), "method.reinforcement.grader.graders"),
    (rft({"type": "multi", "name": "m", "calculate_output": "-" * 1990 + "g", "graders": {"g": CHECK}}),
     "method.reinforcement.grader.calculate_output"),
    (rft({**CHECK, "input": "{{" + " " * 200_000}), None),  # backtracked for days in a server thread
])
def test_a_reinforcement_grader_gets_the_graders_api_checks(live, tmp_path, body, param):
    file_id = upload(live, write_chat_jsonl(tmp_path / "train.jsonl")).id  # so that a job would be created
    resp = post(live.url, JOBS, (body if isinstance(body, str) else json.dumps(body)).replace("file-none", file_id))
    if param is None:  # a valid grader (no template in it): the job is created, at once
        assert resp.status_code == 200, resp.text
        assert httpx.post(f"{live.url}{JOBS}/{resp.json()['id']}/cancel", timeout=60).status_code == 200
    else:
        err = error_of(resp, 400)
        assert (err["param"], err["code"]) == (param, "invalid_grader")
    listing = httpx.get(live.url + JOBS, timeout=60)
    assert listing.status_code == 200, listing.text
    assert [j["status"] for j in listing.json()["data"]] == (["cancelled"] if param is None else [])


@pytest.mark.parametrize(("hyperparameters", "param"), [
    ('{"group_size": NaN}', "group_size"),
    ('{"kl_coef": Infinity}', "kl_coef"),
    ('{"temperature": 1e308}', "temperature"),
    ('{"max_completion_tokens": 1e308}', "max_completion_tokens"),
    ('{"max_completion_tokens": 100000}', "max_completion_tokens"),
    ('{"group_size": "four"}', "group_size"),
    ('{"compute_multiplier": [1]}', "compute_multiplier"),
    ('{"eval_samples": {"a": 1}}', "eval_samples"),
    ('[]', ""),
    ('{"judge_base_url": "http://169.254.169.254/v1"}', "judge_base_url"),  # judges ask this server only
])
def test_reinforcement_hyperparameters_of_any_wrong_type_or_size_are_400s_naming_them(live, hyperparameters, param):
    body = json.dumps(rft(CHECK)).replace('"hyperparameters": {}', f'"hyperparameters": {hyperparameters}')
    err = error_of(post(live.url, JOBS, body), 400)
    assert err["param"] == ("method.reinforcement.hyperparameters" + (f".{param}" if param else ""))


def test_the_jobs_only_app_bounds_the_body(live):
    """create_jobs_app (an API-only node) had no body limit: a job body of any size was read
    and parsed."""
    body = {"model": "smollm2-135m-instruct", "training_file": "file-none", "suffix": "x" * 5_000_000}
    assert error_of(post(live.url, JOBS, body), 413)["code"] == "request_too_large"


@pytest.mark.parametrize(("integration", "param"), [
    ({"type": "wandb", "wandb": {"project": "p" * 1_000_000}}, "integrations[0].wandb.project"),
    ({"type": "wandb", "wandb": {"project": "p", "tags": ["t"] * 100_000}}, "integrations[0].wandb.tags"),
    ({"type": "wandb", "wandb": {"project": "p", "entity": "e" * 10_000}}, "integrations[0].wandb.entity"),
    ({"type": "mlflow", "mlflow": {"project": "p", "tracking_uri": "file:" + "/x" * 100_000}},
     "integrations[0].mlflow.tracking_uri"),
    ({"type": "trackio", "trackio": {"project": "p", "name": "n" * 10_000}}, "integrations[0].trackio.name"),
])
def test_integration_settings_are_bounded(live, integration, param):
    body = {"model": "smollm2-135m-instruct", "training_file": "file-none", "integrations": [integration]}
    err = error_of(post(live.url, JOBS, body), 400)
    assert err["param"] == param


def test_sweep_names_cannot_leave_the_database_and_a_flood_of_misses_starves_no_one(live):
    for name in ("..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a" * 65, "a%00b", "a;b"):
        resp = httpx.get(f"{live.url}/v1/sweeps/{name}", timeout=60)  # (".." is normalised away by the client)
        assert resp.status_code == 404, (name, resp.text)
    # Each miss opened optuna's storage anew (~0.1 s, one at a time under one lock) in a thread of
    # the pool that every sync route runs in: a flood held every thread, and a job listing sent
    # during it waited behind all of it. Now the listing is answered while most of the flood waits.
    n = 200
    done: list[int] = []
    start = threading.Barrier(n + 1)

    def miss(k: int) -> None:
        start.wait()
        done.append(httpx.get(f"{live.url}/v1/sweeps/nope{k}", timeout=300).status_code)

    threads = [threading.Thread(target=miss, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    while not done:  # the server is answering the flood: every request of it has been sent
        time.sleep(0.01)
    listing = httpx.get(live.url + JOBS, timeout=300)
    answered_with = len(done)
    for t in threads:
        t.join()
    assert listing.status_code == 200 and answered_with < n // 2, answered_with
    assert done == [404] * n


def test_what_held(live):
    """Attacks already answered well, kept so that they stay so."""
    for path in ("/v1/files/..%2F..%2Fetc%2Fpasswd/content", "/v1/files/....//....//etc/passwd",
                 f"{JOBS}/..%2F..%2Fx", f"{JOBS}/ftjob-x/events?limit=100000"):
        resp = httpx.get(live.url + path, timeout=60)
        assert resp.status_code in (400, 404), (path, resp.text)
    err = error_of(post(live.url, JOBS, {"model": "../../../etc", "training_file": "file-none"}), 400)
    assert err["param"] == "model"
    err = error_of(post(live.url, JOBS, {"model": "smollm2-135m-instruct", "training_file": "../../etc/passwd"}), 400)
    assert err["param"] == "training_file"
    err = error_of(post(live.url, JOBS, '{"model": "m", "training_file": "f", "seed": 1' + "0" * 5000 + "}"), 400)
    assert err["param"] in ("seed", None)
    body = rft({"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1.0\n"})
    err = error_of(post(live.url, JOBS, body), 400)  # python graders are off unless the operator allows them
    assert err["param"] == "method.reinforcement.grader.type"


def test_python_graders_are_refused_before_their_source_is_parsed(live):
    """Parsing 256 kB of source takes half a second holding the GIL; a server that runs no
    python graders parsed them anyway, then refused them."""
    body = rft({"type": "python", "name": "p", "source": "def grade(s, i)\n" + "x = 1\n" * 40_000})
    err = error_of(post(live.url, JOBS, body), 400)
    assert err["param"] == "method.reinforcement.grader.type"  # not .source: it was never parsed
