"""The graders API on a live loopback server, driven by the official openai client:
client.fine_tuning.alpha.graders.validate and .run, with every grader type; score_model and
label_model ask the tiny model this same server serves."""

from __future__ import annotations

import json

import openai
import pytest

from tunesmith.graders.judge import label_schema, score_schema
from tunesmith.graders.run import run_grader
from tunesmith.graders.types import parse_grader

LABEL = {"type": "string_check", "name": "label", "input": "{{sample.output_json.label}}",
         "reference": "{{item.label}}", "operation": "eq"}
SIMILAR = {"type": "text_similarity", "name": "similar", "input": "{{sample.output_text}}",
           "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
PYTHON = {"type": "python", "name": "short",
          "source": "def grade(sample, item):\n    return 1.0 if len(sample['output_text']) < item['max_len'] else 0.0\n"}
SAMPLE = '{"label": "refund", "reason": "money back"}'
ITEM = {"label": "refund", "answer": '{"label": "refund"}', "max_len": 100}


def test_run_string_check(client):
    result = client.fine_tuning.alpha.graders.run(grader=LABEL, model_sample=SAMPLE, item=ITEM)
    assert result.reward == 1.0
    assert result.metadata.name == "label" and result.metadata.type == "string_check"
    assert not any(v for k, v in result.metadata.errors.model_dump().items() if k.endswith("error"))
    miss = client.fine_tuning.alpha.graders.run(grader=LABEL, model_sample='{"label": "card"}', item=ITEM)
    assert miss.reward == 0.0


@pytest.mark.parametrize("grader", [LABEL, SIMILAR, PYTHON])
def test_run_gives_the_librarys_score(client, grader):
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample=SAMPLE, item=ITEM)
    assert result.reward == run_grader(parse_grader(grader), SAMPLE, ITEM).reward


def test_run_multi_with_python_and_similarity(client):
    grader = {"type": "multi", "name": "combo", "calculate_output": "0.5 * label + 0.25 * similar + 0.25 * short",
              "graders": {"label": LABEL, "similar": SIMILAR, "short": PYTHON}}
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample=SAMPLE, item=ITEM)
    subs = result.sub_rewards
    assert subs["label"] == 1.0 and subs["short"] == 1.0 and 0 < subs["similar"] < 1
    assert result.reward == pytest.approx(0.75 + 0.25 * subs["similar"])


def test_a_failing_python_grader_is_a_grader_error_not_a_failed_request(client):
    grader = {"type": "python", "name": "broken", "source": "def grade(sample, item):\n    return item['nope']\n"}
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={})
    assert result.reward == 0.0 and result.metadata.errors.python_grader_runtime_error is True
    assert "KeyError: 'nope'" in result.metadata.errors.python_grader_runtime_error_details


def test_a_missing_template_field_is_named(client):
    result = client.fine_tuning.alpha.graders.run(grader=LABEL, model_sample="not json", item=ITEM)
    assert result.reward == 0.0 and result.metadata.errors.invalid_variable_error is True


def test_validate_returns_the_grader(client):
    grader = {"type": "multi", "name": "combo", "calculate_output": "label ^ 2", "graders": {"label": LABEL}}
    assert client.fine_tuning.alpha.graders.validate(grader=grader).grader.model_dump(exclude_none=True) == grader


@pytest.mark.parametrize(("grader", "param"), [
    ({**LABEL, "operation": "equals"}, "grader.operation"),
    ({**LABEL, "reference": "{{answer}}"}, "grader.reference"),
    ({k: v for k, v in PYTHON.items() if k != "source"}, "grader.source"),
    ({**PYTHON, "source": "def grade(sample, item) return 1"}, "grader.source"),
    ({"type": "multi", "name": "m", "calculate_output": "label + other", "graders": {"label": LABEL}},
     "grader.calculate_output"),
    ({"type": "multi", "name": "m", "calculate_output": "label", "graders": {"label": {**LABEL, "input": 1}}},
     "grader.graders.label.input"),
])
@pytest.mark.parametrize("route", ["validate", "run"])
def test_a_malformed_grader_is_a_400_naming_the_field(client, grader, param, route):
    with pytest.raises(openai.BadRequestError) as info:
        if route == "validate":
            client.fine_tuning.alpha.graders.validate(grader=grader)
        else:
            client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item=ITEM)
    assert info.value.param == param and info.value.code == "invalid_grader"
    assert param in info.value.message


def _judge_directly(client, model: str, schema: dict, content: str, **kwargs) -> object:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}],
        response_format={"type": "json_schema", "json_schema": {"name": "grade", "schema": schema, "strict": True}},
        **kwargs)
    return json.loads(response.choices[0].message.content)["result"], response.usage.total_tokens


def test_label_model_asks_a_model_this_server_serves(client, engine):
    grader = {"type": "label_model", "name": "judge", "model": engine.base_id,
              "input": [{"role": "user", "content": "Is '{{sample.output_text}}' a refund request? Answer in JSON."}],
              "labels": ["yes", "no"], "passing_labels": ["yes"]}
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="I want my money back", item={})
    label, tokens = _judge_directly(client, engine.base_id, label_schema(["yes", "no"]),
                                    "Is 'I want my money back' a refund request? Answer in JSON.", temperature=0)
    assert result.reward == float(label == "yes")
    assert result.model_grader_token_usage_per_model[engine.base_id]["total_tokens"] == tokens
    assert result.metadata.errors.model_grader_server_error is False


def test_score_model_asks_a_model_this_server_serves(client, engine):
    grader = {"type": "score_model", "name": "judge", "model": engine.base_id, "range": [0, 10],
              "sampling_params": {"temperature": 0, "max_completions_tokens": 12},
              "input": [{"role": "system", "content": "Score the answer from 0 to 10, in JSON."},
                        {"role": "user", "content": "{{sample.output_text}}"}]}
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris", item={})
    response = client.chat.completions.create(
        model=engine.base_id, temperature=0, max_completion_tokens=12,
        messages=[{"role": "system", "content": "Score the answer from 0 to 10, in JSON."},
                  {"role": "user", "content": "Paris"}],
        response_format={"type": "json_schema", "json_schema": {"name": "grade", "schema": score_schema(), "strict": True}})
    text = response.choices[0].message.content
    assert result.model_grader_token_usage_per_model[engine.base_id]["total_tokens"] == response.usage.total_tokens
    try:
        expected = json.loads(text)["result"]
        ok = isinstance(expected, (int, float)) and 0 <= expected <= 10
    except ValueError:  # a random tiny model may not finish its number in 12 tokens
        ok = False
    if ok:
        assert result.reward == float(expected) and not result.metadata.errors.model_grader_parse_error
    else:
        assert result.reward == 0.0 and result.metadata.errors.model_grader_parse_error is True


def test_an_unreachable_judge_is_a_grader_error(client):
    grader = {"type": "score_model", "name": "judge", "model": "no-such-model",
              "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={})
    assert result.reward == 0.0 and result.metadata.errors.model_grader_server_error is True
    assert "no-such-model" in result.metadata.errors.model_grader_server_error_details


def test_python_graders_are_off_unless_the_operator_allows_them(engine, tmp_path):
    """Their code could read the server's files: a default server refuses them (also inside
    multi), with a 400 naming the grader; other graders still run there."""
    from openai import OpenAI
    from serve_helpers import live_server

    from tunesmith.serve.app import create_app
    from tunesmith.settings import Settings

    with live_server(create_app(engine, Settings(home=tmp_path, api_key=None))) as url:
        plain = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as exc:
            plain.fine_tuning.alpha.graders.run(grader=PYTHON, model_sample=SAMPLE, item=ITEM)
        assert exc.value.body["param"] == "grader.type" and "--allow-python-graders" in exc.value.body["message"]
        multi = {"type": "multi", "name": "both", "graders": {"label": LABEL, "short": PYTHON},
                 "calculate_output": "label * short"}
        with pytest.raises(openai.BadRequestError) as exc:
            plain.fine_tuning.alpha.graders.validate(grader=multi)
        assert exc.value.body["param"] == "grader.graders.short.type"
        assert plain.fine_tuning.alpha.graders.run(grader=LABEL, model_sample=SAMPLE, item=ITEM).reward == 1.0


def test_the_judge_is_asked_at_the_servers_own_address_not_the_host_header(server, engine):
    """A client's Host header must not send the judge call (with the server's key) elsewhere."""
    import httpx

    grader = {"type": "label_model", "name": "judge", "model": engine.base_id,
              "input": [{"role": "user", "content": "Is {{sample.output_text}} a fruit?"}],
              "labels": ["yes", "no"], "passing_labels": ["yes"]}
    response = httpx.post(server + "/v1/fine_tuning/alpha/graders/run", headers={"Host": "judge.invalid:9"},
                          json={"grader": grader, "model_sample": "apple", "item": {}}, timeout=120)
    assert response.status_code == 200, response.text
    errors = response.json()["metadata"]["errors"]
    assert errors["model_grader_server_error"] is False, errors
