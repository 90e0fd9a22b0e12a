"""`tunesmith eval`, `compare` and `report` end to end: the CLI on the tiny model.

One test per command runs the real executable in a child process (`run_cli`); the others
call the same command line in this process (`run_tunesmith`), sparing a torch import each."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from eval_helpers import LABELS, make_adapter, run_cli, write_label_csv, write_metrics_jsonl
from in_process import run_tunesmith


class _Collect(HTMLParser):
    """Collects tags and the embedded report data; fails on nothing but records structure."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.data_json = ""
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_data = tag == "script" and ("id", "tunesmith-data") in attrs

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data_json += data


def parse_report(path):
    parser = _Collect()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser, json.loads(parser.data_json)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_writes_predictions_metrics_and_report(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 6, "t")
    out = tmp_path / "ev"
    proc = run_cli("eval", "--model", tiny_model_dir, "--data", test, "--out", out, "--max-new-tokens", "4", "--report")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "predictions.jsonl")
    assert len(rows) == 6
    assert {"input", "reference", "prediction", "correct"} <= set(rows[0])
    assert rows[0]["reference"] == LABELS[0] and rows[0]["input"].startswith("t 0:")
    assert all(isinstance(r["correct"], bool) and r["completion_tokens"] <= 4 for r in rows)
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "label" and m["n_examples"] == 6
    assert m["scores"]["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert m["loss"] > 0 and m["perplexity"] > 1
    assert m["prompt_tokens_per_example"] > 10 and m["latency_s_per_example"] > 0
    assert m["confusion"]["columns"][-1] == "invalid label"
    assert "accuracy" in proc.stdout and "perplexity" in proc.stdout
    parser, data = parse_report(out / "report.html")
    assert "svg" in parser.tags
    assert data["eval"]["metrics"]["n_examples"] == 6
    assert len(data["eval"]["worst"]) == 6


def test_eval_with_adapter_and_system_from_run(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 4, "t")
    run = write_metrics_jsonl(tmp_path / "run")
    make_adapter(tiny_model_dir, run / "adapter")
    base = run_tunesmith("eval", "--model", tiny_model_dir, "--data", test, "--out", tmp_path / "base", "--max-new-tokens", "2")
    tuned = run_tunesmith("eval", "--model", tiny_model_dir, "--adapter", run, "--data", test, "--max-new-tokens", "2")
    assert base.returncode == 0 and tuned.returncode == 0, tuned.stderr
    m_base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    m_tuned = json.loads((run / "eval" / "metrics.json").read_text())  # default --out for a run
    assert m_tuned["adapter"].endswith("adapter")
    assert m_tuned["system"] == "Classify the query."  # read from the run's run.json
    assert m_tuned["loss"] != pytest.approx(m_base["loss"])
    report = run_tunesmith("report", run)
    assert report.returncode == 0, report.stderr
    _, data = parse_report(run / "report.html")
    assert [r["step"] for r in data["training"]] == list(range(1, 11))
    assert data["eval"]["metrics"]["adapter"] == m_tuned["adapter"]


def test_eval_no_loss_skips_the_reference_pass_and_keeps_the_scores(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 4, "t")
    args = ("eval", "--model", tiny_model_dir, "--data", test, "--max-new-tokens", "3")
    full = run_tunesmith(*args, "--out", tmp_path / "full")
    quick = run_tunesmith(*args, "--out", tmp_path / "quick", "--no-loss", "--report")
    assert full.returncode == 0 and quick.returncode == 0, quick.stderr
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_quick = json.loads((tmp_path / "quick" / "metrics.json").read_text())
    assert m_full["loss"] > 0 and m_quick["loss"] is None and m_quick["perplexity"] is None
    assert m_quick["scores"] == m_full["scores"]
    assert [r["prediction"] for r in _rows(tmp_path / "quick" / "predictions.jsonl")] == \
        [r["prediction"] for r in _rows(tmp_path / "full" / "predictions.jsonl")]
    assert all(r["loss"] is None for r in _rows(tmp_path / "quick" / "predictions.jsonl"))
    assert (tmp_path / "quick" / "report.html").is_file()


def test_compare_four_strategies_and_verdict(tiny_model_dir, tmp_path):
    train = write_label_csv(tmp_path / "train.csv", 12, "q")
    test = write_label_csv(tmp_path / "test.csv", 4, "t")
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "cmp"
    proc = run_cli(
        "compare", "--model", tiny_model_dir, "--train", train, "--test", test, "--adapter", adapter,
        "--shots", "2", "--max-new-tokens", "3", "--price-per-million", "2", "--out", out, "--report",
    )
    assert proc.returncode == 0, proc.stderr
    c = json.loads((out / "compare.json").read_text())
    names = [s["name"] for s in c["strategies"]]
    assert names == ["zero-shot", "few-shot", "retrieval few-shot", "fine-tuned"]
    tokens = {s["name"]: s["prompt_tokens_per_request"] for s in c["strategies"]}
    # The label list makes zero-shot longer than the adapter's prompt; shots add more.
    assert tokens["fine-tuned"] < tokens["zero-shot"] < tokens["few-shot"]
    for s in c["strategies"]:
        total = s["prompt_tokens_per_request"] + s["completion_tokens_per_request"]
        assert s["cost_per_million_requests"] == pytest.approx(2 * total)
        assert (out / s["folder"] / "predictions.jsonl").is_file()
        metrics = json.loads((out / s["folder"] / "metrics.json").read_text())
        # Each strategy names its test file; only the adapter is scored on the reference loss.
        assert metrics["data"] == str(test) and (metrics["loss"] is not None) == (s["name"] == "fine-tuned")
    assert c["verdict"] and c["verdict"].endswith(".")
    assert c["verdict"] in " ".join(proc.stdout.split())
    # Few-shot prompts hold the label list and two training answers.
    _, data = parse_report(out / "report.html")
    assert [s["name"] for s in data["comparison"]["strategies"]] == names
    assert data["eval"]["strategy"] == "fine-tuned"


def test_compare_train_adapter_trains_with_defaults_and_compares_it(tiny_model_dir, tmp_path):
    train = write_label_csv(tmp_path / "train.csv", 12, "q")
    test = write_label_csv(tmp_path / "test.csv", 3, "t")
    out = tmp_path / "cmp"
    proc = run_tunesmith(
        "compare", "--model", tiny_model_dir, "--train", train, "--test", test, "--train-adapter",
        "--shots", "1", "--max-new-tokens", "3", "--out", out,
    )
    assert proc.returncode == 0, proc.stderr
    run = out / "adapter-run"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["data"] == str(train) and config["method"] == "lora"  # the defaults, on --train
    losses = [r["train_loss"] for r in _rows(run / "metrics.jsonl") if r.get("train_loss") is not None]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # it trained on the data
    c = json.loads((out / "compare.json").read_text())
    assert [s["name"] for s in c["strategies"]][-1] == "fine-tuned"
    assert c["adapter"].startswith(str(run))
    both = run_tunesmith("compare", "--model", tiny_model_dir, "--train", train, "--test", test,
                   "--train-adapter", "--adapter", run, "--out", tmp_path / "x")
    assert both.returncode == 2 and "not both" in both.stderr


def test_bad_input_is_one_sentence_not_a_traceback(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 2, "t")
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--data", test, "--input-column", "question", "--out", tmp_path / "x")
    assert proc.returncode == 2
    assert "'question'" in proc.stderr and "--input-column" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--data", tmp_path / "missing.jsonl")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tunesmith("report", tmp_path)
    assert proc.returncode == 2 and "nothing to report" in proc.stderr


def test_report_of_a_training_run_only(tmp_path):
    run = write_metrics_jsonl(tmp_path / "run", steps=12)
    proc = run_cli("report", run, "--out", tmp_path / "r.html")
    assert proc.returncode == 0, proc.stderr
    parser, data = parse_report(tmp_path / "r.html")
    assert parser.tags.count("polyline") == 2  # train and validation loss
    assert [r["valid_loss"] for r in data["training"] if "valid_loss" in r] == pytest.approx([3.2 / 5, 3.2 / 10])
    html = (tmp_path / "r.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside


def test_eval_and_compare_hold_answers_to_a_json_schema_or_choices(tiny_model_dir, tiny_tokenizer, tmp_path):
    """--json-schema: every answer that ended parses and validates (jsonschema), answers cut
    by --max-new-tokens are the start of one, and the schema is recorded; --choices holds
    answers to the label set; a schema that cannot be honoured is one sentence and exit 2."""
    import jsonschema
    from eval_helpers import starts_a_match

    from tunesmith.generate.constraints import ANY_OBJECT, Constraint

    schema = {"type": "object", "properties": {"label": {"enum": LABELS}}, "required": ["label"],
              "additionalProperties": False}
    schema_file = tmp_path / "answer.schema.json"
    schema_file.write_text(json.dumps(schema))
    test = write_label_csv(tmp_path / "test.csv", 6, "t")
    out = tmp_path / "ev"
    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", test, "--out", out,
                   "--max-new-tokens", "200", "--metric", "exact", "--json-schema", schema_file)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "predictions.jsonl")
    ended = [r for r in rows if r["completion_tokens"] < 200]
    assert ended, rows  # the label enum leaves short answers
    for r in rows:
        if r in ended:
            jsonschema.validate(json.loads(r["prediction"]), schema)
        else:
            assert starts_a_match(tiny_tokenizer, Constraint.json_schema(schema), r["prediction"]), r
    assert json.loads((out / "metrics.json").read_text())["json_schema"] == schema

    # 2 new tokens cannot hold a label (the tiny tokenizer spends about one a byte): --choices
    # raises the limit to the longest label's tokens and the end of turn, and says so.
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", test, "--out", tmp_path / "ch",
                   "--max-new-tokens", "2", "--metric", "exact", "--choices", ",".join(LABELS))
    assert proc.returncode == 0, proc.stderr
    assert "--max-new-tokens 2 is too few for the longest choice" in proc.stderr
    assert {r["prediction"] for r in _rows(tmp_path / "ch" / "predictions.jsonl")} <= set(LABELS)
    assert json.loads((tmp_path / "ch" / "metrics.json").read_text())["choices"] == LABELS

    train = write_label_csv(tmp_path / "train.csv", 8, "q")
    proc = run_tunesmith("compare", "--model", tiny_model_dir, "--train", train, "--test", test, "--shots", "1",
                   "--max-new-tokens", "32", "--metric", "exact", "--json-mode", "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert c["json_schema"] == ANY_OBJECT
    for s in c["strategies"]:
        for r in _rows(tmp_path / "cmp" / s["folder"] / "predictions.jsonl"):
            assert starts_a_match(tiny_tokenizer, Constraint.json_schema(ANY_OBJECT), r["prediction"]), r

    schema_file.write_text(json.dumps({"type": "object", "not": {"type": "object"}}))
    bad = run_tunesmith("eval", "--model", tiny_model_dir, "--data", test, "--json-schema", schema_file)
    assert bad.returncode == 2 and 'Unimplemented keys: ["not"]' in bad.stderr and "Traceback" not in bad.stderr
    schema_file.write_text("label: card_arrival\n")  # YAML, not JSON
    bad = run_tunesmith("eval", "--model", tiny_model_dir, "--data", test, "--json-schema", schema_file)
    assert bad.returncode == 2 and "is not JSON" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_eval_and_compare_with_int8_weights_say_so(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 4, "t")
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--data", test, "--out", tmp_path / "ev",
                   "--max-new-tokens", "3", "--weights", "int8")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["weights"] == "int8" and m["n_examples"] == 4 and m["loss"] > 0
    train = write_label_csv(tmp_path / "train.csv", 6, "q")
    proc = run_tunesmith("compare", "--model", tiny_model_dir, "--train", train, "--test", test, "--shots", "1",
                   "--adapter", make_adapter(tiny_model_dir, tmp_path / "adapter"), "--max-new-tokens", "2",
                   "--out", tmp_path / "cmp", "--weights", "int8")
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    folders = [tmp_path / "cmp" / s["folder"] for s in c["strategies"]]
    assert len(folders) == 4
    assert all(json.loads((f / "metrics.json").read_text())["weights"] == "int8" for f in folders)


def test_unknown_weights_are_one_sentence(tiny_model_dir, tmp_path):
    test = write_label_csv(tmp_path / "test.csv", 2, "t")
    for cmd in (["eval", "--data", test], ["compare", "--train", test, "--test", test, "--train-adapter"]):
        proc = run_tunesmith(*cmd, "--model", tiny_model_dir, "--weights", "int4", "--out", tmp_path / "x")
        assert proc.returncode == 2, proc.stderr
        assert "unknown --weights 'int4'; accepted: fp32, int8" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "x").exists()  # refused before any work (compare would have trained first)


def test_eval_scores_tool_calls_with_the_tools_in_the_prompt(tiny_model_dir, tmp_path):
    """A held-out set of OpenAI-format tool calls: auto picks tool_call, and each prompt
    carries its line's tools (rendered as training renders them)."""
    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    rows = [{"tools": [weather] if i % 2 else [], "messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"city": f"city {i}"})}}]}]} for i in range(4)]
    data = tmp_path / "calls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_tunesmith("eval", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "ev", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["metric"] == "tool_call" and set(metrics["scores"]) == {"exact_call_rate", "parse_rate",
                                                                           "name_accuracy"}
    prompt_tokens = [r["prompt_tokens"] for r in _rows(tmp_path / "ev" / "predictions.jsonl")]
    assert prompt_tokens[1] > prompt_tokens[0] + 20 and prompt_tokens[3] > prompt_tokens[2] + 20  # tools listed
