"""`tunesmith demo`: the whole lifecycle on banking77, one visible step at a time.

Pull the base model, validate the bundled data, measure the base model zero-shot (same prompt as the adapter) on a
held-out set (every intent, 4 test rows each = 308 rows), LoRA fine-tune, evaluate the
adapter on the same rows, write the report, print base vs tuned side by side. Everything
goes under one output folder:

    OUT/heldout.csv        the held-out rows both models are measured on
    OUT/base/              zero-shot base model: metrics.json, predictions.jsonl
    OUT/run/               the training run (metrics.jsonl, run.json, adapter/)
    OUT/run/eval/          the adapter on the held-out rows
    OUT/run/compare/       base vs tuned (compare.json) for the report
    OUT/run/report.html    the report

    tunesmith demo --out demo-run
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import tunesmith
from tunesmith.data.example import split_example
from tunesmith.data.formats import ColumnMapping
from tunesmith.data.validate import validate_data
from tunesmith.errors import DataError, UsageError
from tunesmith.evaluate.comparison import write_comparison
from tunesmith.evaluate.evaluation import load_examples
from tunesmith.evaluate.report import build_report
from tunesmith.flows.heldout import HeldoutResult, evaluate_side
from tunesmith.models.registry import DEFAULT_MODEL, pull_model
from tunesmith.runs import COMPARE_DIR, EVAL_DIR
from tunesmith.train.config import TrainConfig
from tunesmith.train.run import train

SYSTEM = "Classify the banking customer query into its intent label."
HELDOUT_PER_INTENT = 4
MAX_NEW_TOKENS = 16
# Training recipe for the demo; see docs/evaluation.md for how it was calibrated on the
# held-out rows: 1 epoch (193 steps) 77.3%, 290 steps (1.5 epochs) 83.4%, 2 epochs (386) 86.0%.
# 290 steps keep `make demo` near 11-12 min on the 2-core CPU, whose speed varies enough
# (400-660 tokens/s measured) that two full epochs could pass the 15-minute budget.
DEMO_TRAIN = {"epochs": 2, "max_steps": 290, "learning_rate": 1e-3, "lora_rank": 16, "batch_size": 16}


def find_demo_data() -> Path:
    """The banking77 subset bundled with the repository (data/banking77/)."""

    candidates = [Path(tunesmith.__file__).resolve().parents[2] / "data" / "banking77", Path.cwd() / "data" / "banking77"]
    for cand in candidates:
        if (cand / "train.csv").is_file() and (cand / "test.csv").is_file():
            return cand
    raise UsageError(
        "the bundled banking77 data is missing (looked in "
        + " and ".join(str(c) for c in candidates)
        + "); run the demo from a clone of the tunesmith repository"
    )


def write_heldout(test_csv: Path, out: Path, per_intent: int = HELDOUT_PER_INTENT) -> tuple[Path, int, int]:
    """The first `per_intent` test rows of every intent (file order), as a CSV."""
    by_intent: dict[str, list[list[str]]] = defaultdict(list)
    with open(test_csv, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        i_text, i_cat = header.index("text"), header.index("category")
        for row in reader:
            if len(by_intent[row[i_cat]]) < per_intent:
                by_intent[row[i_cat]].append([row[i_text], row[i_cat]])
    path = out / "heldout.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for intent in sorted(by_intent):
            w.writerows(by_intent[intent])
    return path, sum(len(v) for v in by_intent.values()), len(by_intent)


def run_demo(
    out: Path,
    log: Callable[[str], None] = print,
    model: str | None = None,
    data: Path | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every step; return the base and tuned metrics. Raises TunesmithError on failure.

    model, data and train_overrides exist for the tests (a tiny model, a tiny data set,
    a few steps); the demo itself runs with the defaults."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(n: int, text: str) -> None:
        log(f"\n[{n}/6] {text}  (t = {time.perf_counter() - t_start:.0f} s)")

    model = model or DEFAULT_MODEL
    step(1, f"pull the base model {model}")
    if model == DEFAULT_MODEL:
        pull_model(DEFAULT_MODEL, log=log)
    else:
        log(f"using the local model {model}")

    step(2, "validate the bundled banking77 data")
    bundled = data is None
    data = data or find_demo_data()
    train_csv, test_csv = data / "train.csv", data / "test.csv"
    _validate(train_csv, test_csv, model, 77 if bundled else None, log)
    heldout, n_rows, n_intents = write_heldout(test_csv, out)
    labels = sorted({split_example(ex)[1] for ex in load_examples(train_csv, output_column="category")})
    log(f"held-out set: {n_rows} test rows over {n_intents} intents -> {heldout}")

    # The base model gets the very prompt the adapter will get (the run's system prompt).
    # `tunesmith compare` also measures it with the 77 labels listed in the system prompt;
    # that costs ~570 prompt tokens per row, too slow for the demo's budget on a 2-core CPU.
    step(3, "zero-shot base model on the held-out set (the same prompt the adapter gets)")
    t0 = time.perf_counter()
    held = load_examples(heldout, output_column="category", system=SYSTEM)
    base_res = evaluate_side(model, None, held, heldout, out / "base", SYSTEM, "label", labels, MAX_NEW_TOKENS,
                             with_loss=False, log=log)
    timings["zero_shot_s"] = time.perf_counter() - t0
    log(f"zero-shot accuracy {100 * base_res.metrics['scores']['accuracy']:.1f}% ({timings['zero_shot_s']:.0f} s)")

    step(4, "LoRA fine-tune on the training rows")
    t0 = time.perf_counter()
    run_dir = _train(model, train_csv, out / "run", {**DEMO_TRAIN, **(train_overrides or {})}, log)
    timings["train_s"] = time.perf_counter() - t0

    step(5, "evaluate the adapter on the same held-out rows")
    t0 = time.perf_counter()
    tuned_res = evaluate_side(model, run_dir, held, heldout, run_dir / EVAL_DIR, SYSTEM, "label", labels,
                              MAX_NEW_TOKENS, log=log)
    timings["eval_s"] = time.perf_counter() - t0

    step(6, "write the report")
    info = {
        "model": model, "adapter": str(run_dir), "train": str(train_csv), "test": str(heldout),
        "n_examples": n_rows, "shots": 0, "metric": "label", "main_metric": "accuracy", "price_per_million": 0.0,
    }
    comparison = HeldoutResult(base_res, tuned_res, SYSTEM).comparison(info)
    write_comparison(run_dir / COMPARE_DIR, comparison)
    report = build_report(run_dir)
    timings["total_s"] = time.perf_counter() - t_start
    (out / "demo.json").write_text(json.dumps({
        "heldout_rows": n_rows, "intents": n_intents, "train": DEMO_TRAIN | (train_overrides or {}),
        "base": base_res.metrics["scores"], "tuned": tuned_res.metrics["scores"], "timings": timings,
        "report": str(report),
    }, indent=2) + "\n")
    _print_side_by_side(base_res.metrics, tuned_res.metrics, comparison.verdict, report, timings, log)
    return {"base": base_res.metrics, "tuned": tuned_res.metrics, "report": report, "timings": timings}


def _validate(train_csv: Path, test_csv: Path, model: str, intents: int | None, log: Callable[[str], None]) -> None:
    """The data stage's checks (as `tunesmith validate`), so a broken bundle stops the demo
    before any compute is spent."""
    for path in (train_csv, test_csv):
        report = validate_data(path, model, columns=ColumnMapping("text", "category"), estimate=False)
        if not report.ok:
            shown = "; ".join(f"line {p.line}: {p.message}" for p in report.errors[:5])
            raise DataError(f"{path}: {len(report.errors)} problem(s): {shown}; restore data/banking77/ from the repository")
        labels = (report.stats or {}).get("labels") or {}
        log(f"{path}: {report.examples} rows, {len(labels)} intents, {len(report.warnings)} warning(s), no errors")
        if intents is not None and len(labels) != intents:
            raise DataError(f"{path} covers {len(labels)} intents, not the {intents} of banking77; restore data/banking77/")


def _train(model: str, train_csv: Path, run_dir: Path, settings: dict[str, Any], log: Callable[[str], None]) -> Path:
    cfg = TrainConfig(
        model=model, data=str(train_csv), input_column="text", output_column="category",
        system=SYSTEM, out=str(run_dir), **settings,
    )
    log(f"training: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    result = train(cfg)
    return Path(getattr(result, "out_dir", run_dir))


def _print_side_by_side(base: dict, tuned: dict, sentence: str, report: Path, timings: dict, log: Callable[[str], None]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("", "base model, zero-shot", "fine-tuned adapter", title=f"banking77, {tuned['n_examples']} held-out rows")
    for name in ("accuracy", "macro_f1", "invalid_label_share"):
        table.add_row(name, f"{100 * base['scores'][name]:.1f}%", f"{100 * tuned['scores'][name]:.1f}%")
    table.add_row("prompt tokens/example", f"{base['prompt_tokens_per_example']:.0f}", f"{tuned['prompt_tokens_per_example']:.0f}")
    table.add_row("latency/example", f"{1000 * base['latency_s_per_example']:.0f} ms", f"{1000 * tuned['latency_s_per_example']:.0f} ms")
    Console().print(table)
    log(sentence)
    log(f"time: zero-shot {timings['zero_shot_s']:.0f} s, training {timings['train_s']:.0f} s, "
        f"evaluation {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
    log(f"report: {report}")
