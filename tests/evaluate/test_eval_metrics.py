"""Metrics on hand-made predictions with known answers."""

from __future__ import annotations

import pytest

from tunesmith.errors import UsageError
from tunesmith.evaluate.metrics import (
    INVALID_LABEL, SCORE_NAMES, chrf, json_scores, label_scores, pick_metric, rouge_l, rouge_scores, score,
)
from tunesmith.evaluate.retrieval import BM25


def test_label_accuracy_f1_and_invalid_labels():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "banana", ""]
    s = label_scores(refs, preds)
    assert s.correct == [True, False, True, False, False]
    assert s.summary["accuracy"] == pytest.approx(2 / 5)
    # a: P=1 R=.5 F=2/3; b: P=.5 R=.5 F=.5; c: 0 -> macro (2/3 + 1/2 + 0) / 3
    assert s.summary["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert s.summary["invalid_label_share"] == pytest.approx(2 / 5)
    assert s.extra["invalid_labels"] == {"banana": 1, "": 1}
    conf = s.extra["confusion"]
    assert conf["columns"][-1] == INVALID_LABEL
    assert conf["labels"] == ["a", "b", "c"]
    assert conf["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert s.extra["per_class"]["b"]["precision"] == pytest.approx(0.5)


def test_label_matching_is_whitespace_and_case_tolerant_but_not_fuzzy():
    s = label_scores(["card_arrival", "card_arrival", "card_arrival"], ["  card_arrival\n", "Card_Arrival.", "card arrival"])
    assert s.correct == [True, True, False]


def test_label_set_from_outside_counts_a_known_wrong_label_as_valid():
    s = label_scores(["a", "a"], ["z", "q"], labels=["a", "z"])
    assert s.summary["invalid_label_share"] == pytest.approx(0.5)
    assert s.extra["confusion"]["labels"] == ["a", "z"]


def test_exact_normalises_whitespace_only():
    s = score(["hello  world", "Yes", "x"], ["hello world\n", "yes", ""], metric="exact")
    assert s.correct == [True, False, False]
    assert s.summary["exact_match"] == pytest.approx(1 / 3)


def test_json_parse_keys_and_fields():
    refs = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "y"}', '{"a": 3, "b": "z"}', '{"a": 4}']
    preds = ['{"a": 1, "b": "x"}', '```json\n{"a": 2, "b": "n"}\n```', '{"a": 3, "b": "z"', '']
    s = json_scores(refs, preds)
    assert s.summary["parse_rate"] == pytest.approx(2 / 4)
    assert s.summary["exact_keys_rate"] == pytest.approx(2 / 4)
    # fields: 2 + 1 + 0 + 0 right out of 2 + 2 + 2 + 1
    assert s.summary["field_accuracy"] == pytest.approx(3 / 7)
    assert s.correct == [True, False, False, False]
    assert s.per_example == [1.0, 0.5, 0.0, 0.0]


def test_json_extra_key_is_not_exact_keys():
    s = json_scores(['{"a": 1}'], ['{"a": 1, "b": 2}'])
    assert s.summary["exact_keys_rate"] == 0.0
    assert s.summary["field_accuracy"] == 1.0
    assert s.correct == [False]


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("the cat sat", "dogs run fast") == 0.0
    assert rouge_l("anything", "") == 0.0
    # LCS("the cat sat on the mat", "the cat on a mat") = the cat on mat = 4
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(2 * p * r / (p + r))


def test_chrf_bounds_and_order():
    assert chrf("the weather is nice", "the weather is nice") == pytest.approx(1.0)
    assert chrf("abc", "xyz") == 0.0
    assert chrf("abc", "") == 0.0
    near = chrf("the weather is nice today", "the weather is nice")
    far = chrf("the weather is nice today", "a dog")
    assert 0 < far < near < 1


def test_rouge_scores_summary_with_empty_output():
    s = rouge_scores(["a b c", "d e f"], ["a b c", ""])
    assert s.summary["rouge_l"] == pytest.approx(0.5)
    assert s.summary["exact_match"] == pytest.approx(0.5)
    assert 0 < s.summary["chrf"] < 1


def test_auto_picks_from_references():
    assert pick_metric(['{"a": 1}', "[1, 2]"]) == "json"
    assert pick_metric(["pos", "neg", "pos", "neg", "pos"]) == "label"
    assert pick_metric(["42", "17", "3"]) == "exact"
    assert pick_metric([f"a long free text answer number {i} with many words" for i in range(4)]) == "rouge"


def test_unknown_metric_is_a_usage_error():
    with pytest.raises(UsageError, match="accepted: auto, label"):
        score(["a"], ["a"], metric="bleu")


def test_bm25_finds_the_overlapping_document_first():
    docs = ["my card has not arrived yet", "what is the exchange rate", "how do I link my card", "top up failed"]
    index = BM25(docs)
    assert index.top_k("card not arrived", 2)[0] == 0
    assert index.top_k("exchange rate for euros", 1) == [1]
    # Fewer matches than k: filled in index order, no duplicates.
    got = index.top_k("exchange", 3)
    assert got[0] == 1 and len(set(got)) == 3


def test_tool_call_metric_compares_names_and_arguments_by_value():
    from tunesmith.data.tool_syntax import HERMES, call_text

    weather = call_text(HERMES, "weather", {"city": "Paris", "days": 2})
    alarm = call_text(HERMES, "alarm", {"on": True})
    references = [weather, weather + "\n" + alarm, weather, weather, weather]
    predictions = [
        '<tool_call>\n{"arguments": {"days": 2.0, "city": "Paris"},  "name": "weather"}\n</tool_call>',  # same value
        alarm + "\n" + weather,  # parallel calls in another order
        call_text(HERMES, "weather", {"city": "Rome", "days": 2}),  # right name, wrong argument
        "It is sunny in Paris.",  # no call
        '<tool_call>\n{"name": "weather", "arguments": {"city": \n</tool_call>',  # does not parse
    ]
    s = score(references, predictions, "auto")
    assert s.metric == "tool_call" and s.correct == [True, True, False, False, False]
    assert s.summary == {"exact_call_rate": 0.4, "parse_rate": 0.6, "name_accuracy": 0.6}
    assert score(["plain text answer here"] * 3, ["x"] * 3).metric != "tool_call"


def test_tool_call_metric_reads_a_llama3_models_bare_json_calls():
    """A model with Llama 3.x's template answers `{"name", "parameters"}`; the references are
    written in the default syntax; calls compare by value across the two."""
    from tunesmith.data.tool_syntax import HERMES, LLAMA3_JSON, call_text

    references = [call_text(HERMES, "weather", {"city": "Paris", "days": 2})] * 3
    predictions = ['{"name": "weather", "parameters": {"days": 2.0, "city": "Paris"}}',
                   call_text(LLAMA3_JSON, "weather", {"city": "Rome", "days": 2}),
                   'I would call {"name": "weather", "parameters": {"city": "Paris", "days": 2}}']  # text, no call
    s = score(references, predictions, "tool_call")
    assert s.correct == [True, False, False]
    assert s.summary == {"exact_call_rate": 1 / 3, "parse_rate": 2 / 3, "name_accuracy": 2 / 3}


@pytest.mark.parametrize("metric", sorted(SCORE_NAMES))
def test_score_names_are_what_each_metric_reports(metric):
    """A sweep checks `eval:<score>` against SCORE_NAMES, so they must be each metric's real keys."""
    refs = ['{"a": 1}', "b"] if metric == "json" else ["a", "b"]
    assert tuple(score(refs, refs, metric).summary) == SCORE_NAMES[metric]
