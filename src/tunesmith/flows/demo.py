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
    tunesmith demo --budget-min 13      # the default: fits `make demo` in 15 min on 2 cores

The demo fits a time budget on any machine: after the zero-shot step it knows how fast
this machine evaluates, and a few training steps on one batch of its rows say how fast it
trains; from those it picks how many training steps fit, and prints the accuracy that
many steps reached when calibrated (docs/evaluation.md) before training, and what it got
after.
"""

from __future__ import annotations

import bisect
import csv
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import tunesmith
from tunesmith.data.example import split_example
from tunesmith.data.formats import ColumnMapping
from tunesmith.data.validate import validate_data
from tunesmith.errors import DataError, UsageError
from tunesmith.evaluate.comparison import write_comparison
from tunesmith.evaluate.evaluation import choice_tokens, load_examples
from tunesmith.evaluate.report import build_report
from tunesmith.flows.heldout import HeldoutResult, evaluate_side
from tunesmith.generate.constraints import Constraint
from tunesmith.models.hardware import detect_machine
from tunesmith.models.registry import DEFAULT_MODEL, load_tokenizer, pull_model, resolve_model
from tunesmith.runs import COMPARE_DIR, EVAL_DIR
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig
from tunesmith.train.model import COMPILE_MIN_TOKENS, precision_dtype
from tunesmith.train.run import train
from tunesmith.train.speed import measure_step_s

SYSTEM = "Classify the banking customer query into its intent label."
HELDOUT_PER_INTENT = 4
# Training recipe for the demo. Steps are chosen per machine (plan_steps), at most
# DEMO_MAX_STEPS: 290 steps of batch 16 (1.5 epochs) reached 85.4% on the held-out rows.
# lr 3e-3, not tunesmith train's 1e-3: at 90 steps (where an AVX2-only machine lands) 1e-3
# reached 57.5%, 2e-3 65.6%, 3e-3 67.5%; at 290 steps 3e-3 still reached 85.4% against 83.4%
# (docs/evaluation.md, "The demo's calibration curve").
DEMO_TRAIN = {"epochs": 2, "max_steps": 290, "learning_rate": 3e-3, "lora_rank": 16, "batch_size": 16}
DEMO_MAX_STEPS = 290
DEMO_MIN_STEPS = 30
"""Below this the adapter learns little (36% at 30 steps); the demo trains these even when
they overrun the budget, and says so."""
DEMO_BUDGET_MIN = 13.0
"""The demo's default budget: `make demo` also pulls the model and runs `tunesmith validate`
(with its speed probe) first, about 1-2 min, so 13 keeps the whole of it within 15."""
CALIBRATION = ((30, 0.364), (60, 0.581), (90, 0.675), (150, 0.786), (290, 0.854))
"""Held-out accuracy (308 rows, answers held to the labels) after N steps of DEMO_TRAIN with
max_steps=N (its one-cycle schedule fitted to N), measured with bench/demo_calibration.py;
docs/evaluation.md has the table."""
TUNED_EVAL_RATIO = 1.7
"""The adapter's evaluation takes this many times the zero-shot one: unmerged LoRA layers in
every forward (measured 1.65 with both sides held to the labels, AVX2-capped fp32,
bench/demo_eval.py; before, 1.6-1.7 with free answers and the reference loss on top)."""
TRAIN_START_S = 25.0
"""Loading the model and tokenizing the rows before the first step."""
COMPILE_S = 90.0
"""Compiling the decoder layers with an empty inductor cache (bf16 runs long enough compile)."""
SAFETY_SHARE = 0.06
"""Share of the training budget left unused: the machine's speed drifts while it trains."""


@dataclass(frozen=True)
class StepPlan:
    """How many steps fit, and what that many steps are expected to give."""

    steps: int
    step_s: float
    compile_s: float
    expected_accuracy: float
    expected_train_s: float
    over_budget: bool

    def describe(self) -> str:
        return (f"{self.steps} steps of batch {DEMO_TRAIN['batch_size']} at ~{self.step_s:.1f} s/step"
                + (f" plus ~{self.compile_s:.0f} s compiling" if self.compile_s else "")
                + f" (~{self.expected_train_s / 60:.1f} min); expected held-out accuracy ~"
                + f"{100 * self.expected_accuracy:.0f}% (docs/evaluation.md, calibration curve)")


def expected_accuracy(steps: int) -> float:
    """The calibrated accuracy for `steps`, linear between measured points, flat beyond them."""
    xs = [s for s, _ in CALIBRATION]
    if steps <= xs[0]:
        return CALIBRATION[0][1] * steps / xs[0]
    if steps >= xs[-1]:
        return CALIBRATION[-1][1]
    i = bisect.bisect_right(xs, steps)
    (x0, y0), (x1, y1) = CALIBRATION[i - 1], CALIBRATION[i]
    return y0 + (y1 - y0) * (steps - x0) / (x1 - x0)


def plan_steps(train_budget_s: float, step_s: float, tokens_per_step: float, can_compile: bool) -> StepPlan:
    """The most steps (DEMO_MIN_STEPS..DEMO_MAX_STEPS) whose training fits `train_budget_s`.
    A run long enough to compile (see train.model.should_compile) pays COMPILE_S once; its
    faster compiled steps are not counted on, which keeps the plan on the safe side."""
    usable = train_budget_s * (1 - SAFETY_SHARE) - TRAIN_START_S

    def compile_cost(n: int) -> float:
        return COMPILE_S if can_compile and n * tokens_per_step >= COMPILE_MIN_TOKENS else 0.0

    steps = DEMO_MAX_STEPS
    while steps > DEMO_MIN_STEPS and steps * step_s + compile_cost(steps) > usable:
        steps -= 1
    cost = compile_cost(steps)
    total = TRAIN_START_S + steps * step_s + cost
    return StepPlan(steps, step_s, cost, expected_accuracy(steps), total, total > train_budget_s)


def label_answers(model: str, labels: list[str]) -> tuple[Constraint, int]:
    """What both sides' answers are held to: one of the intent labels (as `tunesmith eval
    --choices`), in at most the longest label's tokens and the end of turn. Held to the labels,
    a row stops decoding as soon as its first tokens single out a label (the engine writes the
    forced rest without a forward pass): about 3 decode steps a row instead of 7-8."""
    tokenizer = load_tokenizer(resolve_model(model))
    return Constraint.choice(labels), choice_tokens(tokenizer, labels)


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
    budget_min: float = DEMO_BUDGET_MIN,
    steps: int | None = None,
) -> dict[str, Any]:
    """Run every step; return the base and tuned metrics. Raises TunesmithError on failure.

    The number of training steps is what fits `budget_min` minutes here (plan_steps), or
    `steps` when given. model, data and train_overrides exist for the tests (a tiny model,
    a tiny data set, a few steps); the demo itself runs with the defaults."""
    if budget_min <= 0:
        raise UsageError(f"--budget-min must be positive (got {budget_min})")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be a positive integer (got {steps})")
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
    train_stats = _validate(train_csv, test_csv, model, 77 if bundled else None, log)
    heldout, n_rows, n_intents = write_heldout(test_csv, out)
    labels = sorted({split_example(ex)[1] for ex in load_examples(train_csv, output_column="category")})
    log(f"held-out set: {n_rows} test rows over {n_intents} intents -> {heldout}")
    answers, max_new_tokens = label_answers(model, labels)
    log(f"answers held to the {len(labels)} intent labels (as `tunesmith eval --choices`), at most {max_new_tokens} tokens")

    # The base model gets the very prompt the adapter will get (the run's system prompt).
    # `tunesmith compare` also measures it with the 77 labels listed in the system prompt;
    # that costs ~570 prompt tokens per row, too slow for the demo's budget on a 2-core CPU.
    step(3, "zero-shot base model on the held-out set (the same prompt the adapter gets)")
    t0 = time.perf_counter()
    held = load_examples(heldout, output_column="category", system=SYSTEM)
    base_res = evaluate_side(model, None, held, heldout, out / "base", SYSTEM, "label", labels, max_new_tokens,
                             with_loss=False, log=log, constraint=answers)
    timings["zero_shot_s"] = time.perf_counter() - t0
    log(f"zero-shot accuracy {100 * base_res.metrics['scores']['accuracy']:.1f}% ({timings['zero_shot_s']:.0f} s)")

    step(4, "LoRA fine-tune on the training rows")
    machine = detect_machine()
    settings = {**DEMO_TRAIN, **(train_overrides or {})}
    # What fits: the budget left after what has run, less the adapter's evaluation (measured
    # from the zero-shot one) and a little for the report.
    left_s = budget_min * 60 - (time.perf_counter() - t_start) - TUNED_EVAL_RATIO * timings["zero_shot_s"] - 5
    plan = _plan(model, train_csv, train_stats, settings, left_s, machine.bf16, log)
    settings["max_steps"] = steps or (train_overrides or {}).get("max_steps") or plan.steps
    if settings["max_steps"] != plan.steps:  # --steps: the plan's costs for that many steps
        n = settings["max_steps"]
        total = TRAIN_START_S + n * plan.step_s + plan.compile_s
        plan = StepPlan(n, plan.step_s, plan.compile_s, expected_accuracy(n), total, total > left_s)
    log(f"machine: {machine.describe()}; budget {budget_min:g} min, {max(0, left_s) / 60:.1f} min of it for training")
    log(f"plan: {plan.describe()}")
    if plan.over_budget:
        log(f"note: {plan.steps} steps take longer than the budget leaves here; the demo will overrun it")
    expected_total_s = time.perf_counter() - t_start + plan.expected_train_s + TUNED_EVAL_RATIO * timings["zero_shot_s"]
    t0 = time.perf_counter()
    run_dir = _train(model, train_csv, out / "run", settings, log)
    timings["train_s"] = time.perf_counter() - t0
    timings["step_s"] = _measured_step_s(run_dir)

    step(5, "evaluate the adapter on the same held-out rows")
    t0 = time.perf_counter()
    tuned_res = evaluate_side(model, run_dir, held, heldout, run_dir / EVAL_DIR, SYSTEM, "label", labels,
                              max_new_tokens, with_loss=False, log=log, constraint=answers)
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
        "heldout_rows": n_rows, "intents": n_intents, "train": settings, "budget_min": budget_min,
        "machine": machine.to_dict(), "plan": asdict(plan), "expected_accuracy": plan.expected_accuracy,
        "expected_total_s": expected_total_s,
        "base": base_res.metrics["scores"], "tuned": tuned_res.metrics["scores"], "timings": timings,
        "report": str(report),
    }, indent=2) + "\n")
    _print_side_by_side(base_res.metrics, tuned_res.metrics, comparison.verdict, report, timings, log)
    log(f"expected ~{100 * plan.expected_accuracy:.0f}% in ~{expected_total_s / 60:.1f} min; "
        f"got {100 * tuned_res.metrics['scores']['accuracy']:.1f}% in {timings['total_s'] / 60:.1f} min"
        f" ({plan.steps} steps on {machine.cpu_class})")
    return {"base": base_res.metrics, "tuned": tuned_res.metrics, "report": report, "timings": timings, "plan": plan}


def _plan(model: str, train_csv: Path, train_stats: dict[str, Any], settings: dict[str, Any], left_s: float,
          bf16: bool, log: Callable[[str], None]) -> StepPlan:
    """Steps that fit `left_s`, from a few training steps on one batch of the demo's own rows,
    timed now (train.speed.measure_step_s): the same packing and shared prefix training
    uses, under whatever else this machine is doing at the moment."""
    ref = resolve_model(model)
    size = min(settings["batch_size"], train_stats["examples"])
    rows, _ = td.render_and_filter(load_tokenizer(ref), load_examples(train_csv, output_column="category", system=SYSTEM)[:size],
                                   2048, str(train_csv))
    step_s = measure_step_s(ref, rows)
    tokens_per_step = train_stats["tokens_per_epoch"] / max(1, train_stats["examples"]) * size
    log(f"measured {step_s:.2f} s per training step of {size} rows here ({'bf16' if bf16 else 'fp32'}, "
        f"{tokens_per_step / step_s:.0f} tokens/s)")
    return plan_steps(left_s, step_s, tokens_per_step, can_compile=bf16)


def _measured_step_s(run_dir: Path) -> float | None:
    """Mean seconds per step of the training run, from its metrics (compiling left out)."""
    info = json.loads((run_dir / "run.json").read_text())
    m = info.get("metrics") or {}
    steps, spent, compiling = m.get("steps"), m.get("train_time_s"), m.get("compile_s")
    if compiling:
        steps, spent = steps - 1, spent - compiling
    return round(spent / steps, 3) if steps and spent else None


def _validate(train_csv: Path, test_csv: Path, model: str, intents: int | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    """The data stage's checks (as `tunesmith validate`), so a broken bundle stops the demo
    before any compute is spent. Returns the training file's stats (token counts)."""
    stats: dict[str, Any] = {}
    for path in (train_csv, test_csv):
        report = validate_data(path, model, columns=ColumnMapping("text", "category"), estimate=False)
        if not report.ok:
            shown = "; ".join(f"line {p.line}: {p.message}" for p in report.errors[:5])
            raise DataError(f"{path}: {len(report.errors)} problem(s): {shown}; restore data/banking77/ from the repository")
        labels = (report.stats or {}).get("labels") or {}
        log(f"{path}: {report.examples} rows, {len(labels)} intents, {len(report.warnings)} warning(s), no errors")
        if intents is not None and len(labels) != intents:
            raise DataError(f"{path} covers {len(labels)} intents, not the {intents} of banking77; restore data/banking77/")
        stats = stats or report.stats
    return stats


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
