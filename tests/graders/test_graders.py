"""The graders library: shapes, templates, metrics, formulas and the multi grader, without a network."""

from __future__ import annotations

import math

import pytest

from tunesmith.graders.formula import FormulaError, evaluate
from tunesmith.graders.run import Grading, run_grader, validate_grader
from tunesmith.graders.similarity import similarity
from tunesmith.graders.templates import TemplateError, build_sample, render
from tunesmith.graders.types import GraderError, SIMILARITY_METRICS, parse_grader


def check(op: str, input: str = "{{sample.output_text}}", reference: str = "{{item.label}}") -> dict:
    return {"type": "string_check", "name": "check", "input": input, "reference": reference, "operation": op}


@pytest.mark.parametrize(("op", "answer", "reward"), [
    ("eq", "card_arrival", 1.0), ("eq", "Card_arrival", 0.0), ("ne", "card_arrival", 0.0), ("ne", "other", 1.0),
    ("like", "it is card_arrival.", 1.0), ("like", "CARD_ARRIVAL", 0.0), ("ilike", "It is CARD_ARRIVAL", 1.0),
    ("ilike", "card", 0.0),
])
def test_string_check_operations(op, answer, reward):
    result = run_grader(parse_grader(check(op)), answer, {"label": "card_arrival"})
    assert result.reward == reward and not result.error


@pytest.mark.parametrize(("obj", "param", "words"), [
    (check("eqq"), "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
    ({**check("eq"), "extra": 1}, "grader.extra", "unknown field"),
    ({k: v for k, v in check("eq").items() if k != "reference"}, "grader.reference", "missing field"),
    ({"type": "nope", "name": "x"}, "grader.type", "string_check, text_similarity"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {**check("eq"), "input": 3}}},
     "grader.graders.a.input", "valid string"),
    ({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "cosine"},
     "grader.evaluation_metric", "fuzzy_match"),
])
def test_a_malformed_grader_names_the_field(obj, param, words):
    with pytest.raises(GraderError) as info:
        parse_grader(obj)
    assert info.value.param == param and words in str(info.value)


@pytest.mark.parametrize(("obj", "param", "words"), [
    (check("eq", input="{{output_text}}"), "grader.input", "item.<field> or sample.<field>"),
    (check("eq", reference="{{sample.text}}"), "grader.reference", "output_text, output_json"),
    ({"type": "python", "name": "p", "source": "def grade(sample, item) return 1"}, "grader.source", "does not compile"),
    ({"type": "python", "name": "p", "source": "def score(sample, item): return 1"}, "grader.source", "grade(sample, item)"),
    ({"type": "multi", "name": "m", "calculate_output": "a + b", "graders": {"a": check("eq")}},
     "grader.calculate_output", "'b', which is not one of the graders"),
    ({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
      "labels": ["good", "bad"], "passing_labels": ["great"]}, "grader.passing_labels", "['great']"),
    ({"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]},
     "grader.range", "low < high"),
])
def test_validation_names_what_can_never_run(obj, param, words):
    with pytest.raises(GraderError) as info:
        validate_grader(parse_grader(obj))
    assert info.value.param == param and words in str(info.value)


def test_the_sdk_shape_of_multi_takes_one_grader_under_its_name():
    grader = parse_grader({"type": "multi", "name": "m", "calculate_output": "check * 2", "graders": check("eq")})
    assert list(grader.graders) == ["check"]
    assert run_grader(grader, "x", {"label": "x"}).reward == 2.0


def test_templates_resolve_item_text_and_json_paths():
    sample = build_sample('{"label": "refund", "scores": [0.25, 0.75]}')
    item = {"meta": {"tags": ["a", "b"]}, "n": 3}
    assert render("{{item.meta.tags.1}} {{ item.n }} {{sample.output_json.label}} {{sample.output_json.scores}}",
                  sample, item) == "b 3 refund [0.25, 0.75]"
    assert render("[{{sample.output_text}}]", build_sample("plain"), {}) == "[plain]"


@pytest.mark.parametrize(("template", "answer", "words"), [
    ("{{item.answer}}", "x", "item has no field 'answer'; it has label"),
    ("{{sample.output_json.label}}", "not json", "sample.output_json is not JSON"),
    ("{{sample.output_json.reason}}", '{"label": 1}', "sample.output_json has no field 'reason'"),
])
def test_a_missing_field_is_an_error_naming_it(template, answer, words):
    with pytest.raises(TemplateError, match=words):
        render(template, build_sample(answer), {"label": "x"})
    result = run_grader(parse_grader(check("eq", input=template)), answer, {"label": "x"})
    assert result.reward == 0.0 and result.errors["invalid_variable_error"] is True
    assert words in result.to_openai()["metadata"]["errors"] or words in result.error_text()


@pytest.mark.parametrize("metric", SIMILARITY_METRICS)
def test_every_similarity_metric_ranks_a_close_answer_above_a_far_one(metric):
    reference = "the card I ordered last week has still not arrived"
    close = similarity(metric, "the card I ordered last week has not arrived yet", reference)
    far = similarity(metric, "how do I change my PIN number", reference)
    same = similarity(metric, reference, reference)
    assert 0.0 <= far < close <= same <= 1.0 and same > 0.9


def test_fuzzy_match_is_rapidfuzz_wratio_after_default_processing():
    from rapidfuzz import fuzz, utils

    expected = fuzz.WRatio("Card Arrival!", "card arrival", processor=utils.default_process) / 100
    assert similarity("fuzzy_match", "Card Arrival!", "card arrival") == expected == 1.0


def test_pass_threshold_says_whether_a_sample_passes():
    grader = parse_grader({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                           "reference": "{{item.ref}}", "evaluation_metric": "rouge_1", "pass_threshold": 0.5})
    with Grading(grader) as grading:
        assert grading.run("the cat sat", {"ref": "the cat sat"}).passed is True
        assert grading.run("a dog ran", {"ref": "the cat sat"}).passed is False


def test_formula_follows_openai_operators_and_functions():
    values = {"a": 0.5, "b": 0.25}
    assert evaluate("a ^ 2 + b", values) == 0.5
    assert evaluate("min(a, b) + max(a, b) * 2 - abs(-1) + floor(1.5) + ceil(0.2)", values) == 2.25
    assert math.isclose(evaluate("sqrt(b) + exp(0) + log(1)", values), 1.5)


@pytest.mark.parametrize("formula", ['__import__("os").system("true")', "a.__class__", "(lambda: 1)()",
                                     "[a]", "a if b else 1", "open('x')", "a; b"])
def test_formula_refuses_anything_but_arithmetic(formula):
    with pytest.raises(FormulaError):
        evaluate(formula, {"a": 1.0, "b": 1.0})


def test_multi_combines_sub_graders_and_a_failing_one_scores_zero():
    grader = parse_grader({
        "type": "multi", "name": "combo", "calculate_output": "0.75 * label + 0.25 * words",
        "graders": {
            "label": check("eq", input="{{sample.output_json.label}}"),
            "words": {"type": "text_similarity", "name": "words", "input": "{{sample.output_json.reason}}",
                      "reference": "{{item.reason}}", "evaluation_metric": "rouge_1"},
        },
    })
    item = {"label": "refund", "reason": "money back"}
    good = run_grader(grader, '{"label": "refund", "reason": "money back"}', item)
    assert good.reward == 1.0 and good.sub_rewards == {"label": 1.0, "words": 1.0} and not good.error
    half = run_grader(grader, '{"label": "refund"}', item)
    assert half.reward == 0.75 and half.sub_rewards["words"] == 0.0
    assert half.errors["invalid_variable_error"] and "words: " in half.errors["invalid_variable_details"]


def test_the_run_result_has_openai_shape():
    from openai.types.fine_tuning.alpha import GraderRunResponse

    body = run_grader(parse_grader(check("eq")), "x", {"label": "x"}).to_openai()
    parsed = GraderRunResponse.model_validate(body)
    assert parsed.reward == 1.0 and parsed.metadata.type == "string_check" and parsed.metadata.name == "check"
    assert parsed.metadata.errors.python_grader_runtime_error is False
    assert set(body["metadata"]["errors"]) == set(GraderRunResponse.model_fields["metadata"].annotation
                                                  .model_fields["errors"].annotation.model_json_schema()["properties"])
