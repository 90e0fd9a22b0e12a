"""The demo's whole pipeline on the tiny model and a tiny banking-like data set."""

from __future__ import annotations

import json

from eval_helpers import write_label_csv
from tunesmith.flows.demo import find_demo_data, run_demo, write_heldout


def test_demo_pipeline_writes_everything_under_one_folder(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_label_csv(data / "train.csv", 24, "q")
    write_label_csv(data / "test.csv", 15, "t")
    out = tmp_path / "demo"
    lines: list[str] = []
    res = run_demo(out, log=lines.append, model=str(tiny_model_dir), data=data,
                   train_overrides={"max_steps": 2, "epochs": 1, "batch_size": 4})
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
    assert set(summary["timings"]) == {"zero_shot_s", "train_s", "eval_s", "total_s"}
    assert str(res["report"]) in text
    html = (out / "run" / "report.html").read_text()
    assert "fine-tuned" in html and "polyline" in html


def test_bundled_demo_data_covers_all_intents_and_heldout_is_big_enough(tmp_path):
    data = find_demo_data()
    path, rows, intents = write_heldout(data / "test.csv", tmp_path)
    assert intents == 77 and rows >= 300
