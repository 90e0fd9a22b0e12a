"""The demo's whole pipeline on the tiny model and a tiny banking-like data set."""

from __future__ import annotations

import json

from eval_helpers import write_label_csv
import pytest

from tunesmith.flows import demo
from tunesmith.flows.demo import find_demo_data, run_demo, write_heldout


def test_demo_pipeline_writes_everything_under_one_folder(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_label_csv(data / "train.csv", 24, "q")
    write_label_csv(data / "test.csv", 15, "t")
    out = tmp_path / "demo"
    lines: list[str] = []
    res = run_demo(out, log=lines.append, model=str(tiny_model_dir), data=data,
                   train_overrides={"epochs": 1, "batch_size": 4}, steps=2)
    text = "\n".join(lines)
    for n in range(1, 7):
        assert f"[{n}/6]" in text
    # 4 held-out rows per intent, 3 intents.
    assert res["base"]["n_examples"] == res["tuned"]["n_examples"] == 12
    for rel in ("heldout.csv", "base/metrics.json", "run/adapter/adapter_config.json", "run/metrics.jsonl",
                "run/eval/predictions.jsonl", "run/compare/compare.json", "run/report.html", "demo.json"):
        assert (out / rel).is_file(), rel
    summary = json.loads((out / "demo.json").read_text())
    assert summary["heldout_rows"] == 12 and summary["intents"] == 3
    assert set(summary["timings"]) == {"zero_shot_s", "train_s", "step_s", "eval_s", "total_s"}
    # The budget: the machine, the plan with its expected accuracy, then what it got.
    assert summary["train"]["max_steps"] == 2 and summary["plan"]["steps"] == 2
    assert summary["expected_accuracy"] == pytest.approx(demo.expected_accuracy(2))
    assert summary["machine"]["class"] in {"CUDA", "AMX", "AVX512-BF16", "AVX2", "other"}
    assert summary["budget_min"] == demo.DEMO_BUDGET_MIN and summary["timings"]["step_s"] > 0
    assert "s per training step of 4 rows here" in text
    assert text.index("plan: 2 steps") < text.index("[5/6]")
    assert "expected ~" in text and "got " in text.split("expected ~")[-1]
    assert str(res["report"]) in text
    # Both sides answer with one of the intent labels (said in the log and in each metrics.json).
    assert "answers held to the 3 intent labels" in text
    for side in ("base", "run/eval"):
        metrics = json.loads((out / side / "metrics.json").read_text())
        assert len(metrics["choices"]) == 3
        assert all(json.loads(line)["prediction"] in metrics["choices"]
                   for line in (out / side / "predictions.jsonl").read_text().splitlines())
    html = (out / "run" / "report.html").read_text()
    assert "fine-tuned" in html and "polyline" in html


def test_bundled_demo_data_covers_all_intents_and_heldout_is_big_enough(tmp_path):
    data = find_demo_data()
    path, rows, intents = write_heldout(data / "test.csv", tmp_path)
    assert intents == 77 and rows >= 300


def test_the_plan_fits_the_budget_and_says_what_to_expect():
    roomy = demo.plan_steps(train_budget_s=3600, step_s=1.0, tokens_per_step=700, can_compile=False)
    assert roomy.steps == demo.DEMO_MAX_STEPS and not roomy.over_budget
    assert roomy.expected_accuracy == pytest.approx(0.854)
    # An AVX2-like machine: 8 s a step, 8 minutes for training -> fewer steps, within budget.
    slow = demo.plan_steps(train_budget_s=480, step_s=8.0, tokens_per_step=700, can_compile=False)
    assert demo.DEMO_MIN_STEPS < slow.steps < demo.DEMO_MAX_STEPS and not slow.over_budget
    assert slow.expected_train_s <= 480 and (slow.steps + 1) * 8.0 + demo.TRAIN_START_S > 480 * (1 - demo.SAFETY_SHARE)
    assert slow.expected_accuracy < roomy.expected_accuracy
    # Compiling costs its minute and a half once the run is long enough to compile.
    compiled = demo.plan_steps(train_budget_s=600, step_s=1.8, tokens_per_step=700, can_compile=True)
    eager = demo.plan_steps(train_budget_s=600, step_s=1.8, tokens_per_step=700, can_compile=False)
    assert compiled.compile_s == demo.COMPILE_S and eager.compile_s == 0 and compiled.steps < eager.steps
    # Too little time: the minimum that teaches anything, flagged as over the budget.
    tight = demo.plan_steps(train_budget_s=60, step_s=8.0, tokens_per_step=700, can_compile=False)
    assert tight.steps == demo.DEMO_MIN_STEPS and tight.over_budget
    assert str(tight.steps) in tight.describe() and "expected held-out accuracy" in tight.describe()


def test_expected_accuracy_follows_the_calibration_curve():
    for steps, acc in demo.CALIBRATION:
        assert demo.expected_accuracy(steps) == pytest.approx(acc)
    values = [demo.expected_accuracy(n) for n in range(1, 500, 7)]
    assert values == sorted(values) and values[-1] == demo.CALIBRATION[-1][1]
    assert demo.expected_accuracy(120) == pytest.approx((0.675 + 0.786) / 2)


def test_demo_refuses_a_nonsense_budget(tmp_path):
    from tunesmith.errors import UsageError

    with pytest.raises(UsageError, match="--budget-min must be positive"):
        run_demo(tmp_path, budget_min=0)
    with pytest.raises(UsageError, match="--steps must be a positive integer"):
        run_demo(tmp_path, steps=0)


def test_cli_budget_default_is_the_flow_default():
    import inspect

    from tunesmith.cli.evaluate import demo_cmd

    assert inspect.signature(demo_cmd).parameters["budget_min"].default.default == demo.DEMO_BUDGET_MIN
