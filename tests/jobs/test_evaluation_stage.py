"""The job's evaluation stage reads the validation file as the run read it (its CSV columns),
generates no more than the longest answer needs, and evaluates a base model once per set of rows:
each sweep trial on the same validation file used to evaluate the same base again."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tiny_model import make_adapter
from tunesmith.jobs.evaluation_stage import answer_budget, run_stage

LABELS = ["card_arrival", "exchange_rate", "card_linking"]


def write_rows(path: Path, n: int, prefix: str = "row") -> Path:
    """Three columns, so the answer column cannot be guessed: only the run's settings name it."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "question", "intent"])
        for i in range(n):
            w.writerow([i, f"{prefix} {i}: where is my card?", LABELS[i % 3]])
    return path


@pytest.fixture
def run_dir(tiny_model_dir, tmp_path) -> Path:
    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter", seed=3)
    config = {"model": str(tiny_model_dir), "input_column": "question", "output_column": "intent",
              "system": "Classify the query.", "format": None}
    (run / "run.json").write_text(json.dumps({"config": config, "base_model": {"name": "tiny", "sha256": "ab" * 32}}))
    return run


def stage(run: Path, model: Path, data: Path, out: Path, cache: Path | None, capsys) -> tuple[dict, str]:
    summary = run_stage(str(model), run / "adapter", data, out, base_cache=cache)
    return summary, capsys.readouterr().err


def test_the_answer_budget_is_the_longest_answer_in_the_runs_columns(run_dir, tiny_model_dir, tiny_tokenizer,
                                                                      tmp_path, capsys):
    data = write_rows(tmp_path / "valid.csv", 6)
    summary, log = stage(run_dir, tiny_model_dir, data, tmp_path / "eval", None, capsys)
    longest = max(len(tiny_tokenizer(label, add_special_tokens=False)["input_ids"]) for label in LABELS)
    assert f"generating up to {longest + 8} tokens per example" in log
    assert longest + 8 < 256  # the old reader found no answers in a CSV and fell back to 256
    assert summary["n_examples"] == 6
    refs = [json.loads(line)["reference"] for line in (tmp_path / "eval" / "tuned" / "predictions.jsonl").open()]
    assert refs == [LABELS[i % 3] for i in range(6)]


def test_answer_budget_counts_tool_calls_as_the_model_writes_them(tiny_model_dir):
    from tunesmith.data.example import Example, Message

    call = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    ex = Example((Message("user", "weather?"), Message("assistant", "", train=True, tool_calls=call)))
    assert answer_budget(str(tiny_model_dir), [ex]) > 8 + 5  # not the empty content's 0 tokens


def test_a_base_evaluated_on_the_same_rows_is_reused(run_dir, tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "valid.csv", 6)
    cache = tmp_path / "cache"
    first, log1 = stage(run_dir, tiny_model_dir, data, tmp_path / "eval1", cache, capsys)
    assert "reusing" not in log1 and "base model: evaluating on 6 examples" in log1
    assert len(list(cache.iterdir())) == 1

    second, log2 = stage(run_dir, tiny_model_dir, data, tmp_path / "eval2", cache, capsys)
    assert "reusing" in log2 and "base model: evaluating" not in log2
    assert second["base"] == first["base"] and second["tuned"] == first["tuned"]
    # The job's folder still holds the base side's predictions, as if it had run.
    assert (tmp_path / "eval1" / "base" / "predictions.jsonl").read_text() == \
        (tmp_path / "eval2" / "base" / "predictions.jsonl").read_text()

    # Other rows are another evaluation.
    other = write_rows(tmp_path / "other.csv", 6, prefix="other")
    _, log3 = stage(run_dir, tiny_model_dir, other, tmp_path / "eval3", cache, capsys)
    assert "reusing" not in log3 and len(list(cache.iterdir())) == 2


def test_a_run_that_does_not_name_its_base_weights_is_never_matched(run_dir, tiny_model_dir, tmp_path, capsys):
    info = json.loads((run_dir / "run.json").read_text())
    del info["base_model"]
    (run_dir / "run.json").write_text(json.dumps(info))
    data = write_rows(tmp_path / "valid.csv", 3)
    cache = tmp_path / "cache"
    stage(run_dir, tiny_model_dir, data, tmp_path / "eval1", cache, capsys)
    _, log = stage(run_dir, tiny_model_dir, data, tmp_path / "eval2", cache, capsys)
    assert "reusing" not in log
    assert not cache.exists() or not any(cache.iterdir())  # nothing kept that nothing could match


def test_a_full_fine_tune_is_evaluated_by_its_own_weights(tiny_model_dir, tmp_path):
    """A full fine-tuning run saves whole weights where a LoRA run has its adapter: the
    stage loaded it as an adapter and failed ("holds no adapter"), so a sweep over
    `method: full` recorded no score for any trial."""
    import torch
    from safetensors.torch import load_file

    from tunesmith.models.inference import load_for_inference
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    data = write_rows(tmp_path / "train.csv", 12)
    out = tmp_path / "full"
    result = train(TrainConfig(model=str(tiny_model_dir), data=data, out=out, method="full", max_steps=2,
                               batch_size=4, precision="fp32", learning_rate=1e-2, input_column="question",
                               output_column="intent"), progress=False)
    saved = load_file(result.adapter_dir / "model.safetensors")
    name = next(k for k in saved if "layers.0." in k and k.endswith("proj.weight"))
    tuned, base = load_for_inference(str(tiny_model_dir), out), load_for_inference(str(tiny_model_dir))
    assert torch.equal(tuned.model.state_dict()[name], saved[name])
    assert not torch.equal(base.model.state_dict()[name], saved[name])  # training changed it
    summary = run_stage(str(tiny_model_dir), out / "adapter", write_rows(tmp_path / "valid.csv", 6), tmp_path / "eval")
    assert summary["n_examples"] == 6
    assert len((tmp_path / "eval" / "tuned" / "predictions.jsonl").read_text().splitlines()) == 6
