"""`tunesmith eval`: generate on held-out data, score, measure loss, write the results.

An evaluation directory holds `predictions.jsonl` (one row per example: input, reference,
prediction, correct, plus score, loss and token counts) and `metrics.json` (headline
scores, loss/perplexity, latency, tokens, and the confusion matrix for label tasks).

    tunesmith eval --model smollm2-135m-instruct --adapter runs/first --data test.jsonl --out runs/first/eval
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith.data.example import Example, Message, split_example
from tunesmith.data.formats import ColumnMapping, read_data
from tunesmith.data.render import render_prompt
from tunesmith.errors import DataError, UsageError
from tunesmith.evaluate.loss import reference_loss
from tunesmith.evaluate.metrics import score
from tunesmith.generate.constraints import Constraint
from tunesmith.generate.engine import Completion, LocalEngine, SamplingParams
from tunesmith.models.inference import LoadedModel, load_for_inference
from tunesmith.runs import EVAL_METRICS_FILE, PREDICTIONS_FILE, RUN_FILE


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def load_examples(
    path: str | Path,
    format: str | None = None,
    input_column: str = "text",
    output_column: str | None = None,
    system: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read a data file of examples with reference answers; every problem in one error.

    For CSV/TSV without --output-column, a header with exactly one other column than the
    input column uses that one."""
    path = Path(path)
    columns = None
    if (format or path.suffix.lower().lstrip(".")) in ("csv", "tsv", "tab"):
        output_column = output_column or other_column(path, input_column)
        columns = ColumnMapping(input_column=input_column, output_column=output_column, system=system)
    parsed = read_data(path, format=format, columns=columns)
    if parsed.errors:
        shown = "; ".join(f"line {p.line}: {p.message}" for p in parsed.errors[:5])
        more = f" (and {len(parsed.errors) - 5} more)" if len(parsed.errors) > 5 else ""
        raise DataError(f"{path}: {len(parsed.errors)} problem(s): {shown}{more}; fix them (`tunesmith validate {path}` lists all)")
    examples = parsed.examples
    if not examples:
        raise DataError(f"{path} holds no supervised examples (a preference file cannot be evaluated)")
    if system and columns is None:
        examples = [with_system(ex, system) for ex in examples]
    for ex in examples:
        split_example(ex)  # raises for an example without an answer
    return examples[:limit] if limit else examples


def other_column(path: Path, input_column: str) -> str:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if not path.is_file():
        raise UsageError(f"data file '{path}' does not exist")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter), [])
    if input_column not in header:
        raise UsageError(
            f"{path}: column '{input_column}' not found; the header has {', '.join(repr(h) for h in header)}; "
            "choose with --input-column and --output-column"
        )
    others = [h for h in header if h != input_column]
    if len(others) != 1:
        raise UsageError(
            f"{path}: cannot tell which column holds the answers (header: {', '.join(header)}); "
            "pass --output-column"
        )
    return others[0]


def with_system(example: Example, system: str) -> Example:
    """The example with `system` as its system prompt (replacing one it has)."""
    rest = tuple(m for m in example.messages if m.role != "system")
    return Example(messages=(Message("system", system),) + rest, line=example.line, tools=example.tools)


def run_info(adapter: str | Path | None) -> dict[str, Any]:
    """The run.json of the training run an adapter came from ({} when unknown or unreadable)."""
    if adapter is None:
        return {}
    path = Path(adapter)
    for cand in (path / RUN_FILE, path.parent / RUN_FILE, path.parent.parent / RUN_FILE):
        if cand.is_file():
            try:
                info = json.loads(cand.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
            return info if isinstance(info, dict) else {}
    return {}


def run_system_prompt(adapter: str | Path | None) -> str | None:
    """The system prompt a training run used, from its run.json (None when unknown)."""
    info = run_info(adapter)
    cfg = info.get("config", info)
    value = cfg.get("system") if isinstance(cfg, dict) else None
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: str | Path | None,
    data: str | Path,
    adapter: str | Path | None = None,
    metric: str = "auto",
    out: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    format: str | None = None,
    input_column: str = "text",
    output_column: str | None = None,
    system: str | None = None,
    limit: int | None = None,
    constraint: Constraint | None = None,
    weights: str = "fp32",
    log: Callable[[str], None] = print,
    with_loss: bool = True,
) -> EvalResult:
    """Evaluate a model (and adapter) on a data file; write predictions and metrics to `out`.

    system: the system prompt; by default the one the adapter's run trained with.
    constraint: hold each answer to it (a JSON Schema, a choice of labels), as serve does.
    weights: how the base's linear layers are stored (models.inference.WEIGHTS).
    with_loss: also measure the loss on the reference answers (a second pass over every row)."""
    system = system if system is not None else run_system_prompt(adapter)
    examples = load_examples(data, format, input_column, output_column, system, limit)
    log(f"evaluating on {len(examples)} examples from {data}")
    return evaluate_examples(
        model, adapter, examples, data, out, system, metric=metric, max_new_tokens=max_new_tokens,
        batch_size=batch_size, precision=precision, constraint=constraint, weights=weights, log=log,
        with_loss=with_loss,
    )


def evaluate_examples(
    model: str | Path | None,
    adapter: str | Path | None,
    examples: Sequence[Example],
    data: str | Path,
    out: str | Path | None,
    system: str | None,
    metric: str = "auto",
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    constraint: Constraint | None = None,
    with_loss: bool = True,
    weights: str = "fp32",
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Load the model (and adapter), score it on examples already read from `data`, record
    where they came from and the system prompt they carry, and write the results to `out`.
    The adapter is merged into the base for the run (one adapter, every row)."""
    loaded = load_for_inference(model, adapter, weights=weights, merge=True)
    result = evaluate_loaded(
        loaded, examples, labels=labels, metric=metric, max_new_tokens=max_new_tokens, batch_size=batch_size,
        precision=precision, with_loss=with_loss, constraint=constraint, log=log,
    )
    result.metrics["data"] = str(data)
    if system:
        result.metrics["system"] = system
    if out is not None:
        write_eval(Path(out), result)
    return result


def evaluate_loaded(
    loaded: LoadedModel,
    examples: Sequence[Example],
    prompts: Sequence[Sequence[Message]] | None = None,
    metric: str = "auto",
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    with_loss: bool = True,
    constraint: Constraint | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Score a loaded model on examples; prompts default to each example's own conversation
    (as trained). `with_loss` also measures the loss on the reference answers.

    Answers come from the serving engine, greedy: at most `batch_size` rows per step, and
    with a constraint each held to it, as the server holds them."""
    split = [split_example(ex) for ex in examples]
    references = [ref for _, ref in split]
    prompts = prompts if prompts is not None else [p for p, _ in split]
    max_new_tokens = _room_for_choices(loaded.tokenizer, constraint, max_new_tokens, log)
    t0 = time.perf_counter()
    gens = generate_greedy(loaded, prompts, max_new_tokens, batch_size, precision, constraint,
                           _progress(len(prompts), log), tools=[ex.tools for ex in examples])
    gen_s = time.perf_counter() - t0
    predictions = [g.text for g in gens]
    scores = score(references, predictions, metric, labels)
    loss = None
    if with_loss:
        loss = reference_loss(loaded.model, loaded.tokenizer, examples, batch_size, precision)
    n = len(examples)
    rows = []
    for i, (ex, (prompt, ref), g) in enumerate(zip(examples, split, gens)):
        rows.append({
            "line": ex.line,
            "input": _last_user(prompt),
            "reference": ref,
            "prediction": g.text,
            "correct": bool(scores.correct[i]),
            "score": round(scores.per_example[i], 4),
            "loss": _num(loss.per_example[i]) if loss else None,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
        })
    main_name, _ = scores.main
    metrics: dict[str, Any] = {
        "model": loaded.name,
        "adapter": str(loaded.adapter) if loaded.adapter else None,
        "metric": scores.metric,
        "main_metric": main_name,
        "n_examples": n,
        "scores": scores.summary,
        "loss": _num(loss.loss) if loss else None,
        "perplexity": _num(loss.perplexity) if loss else None,
        "latency_s_per_example": gen_s / n if n else 0.0,
        "prompt_tokens_per_example": sum(g.prompt_tokens for g in gens) / n if n else 0.0,
        "completion_tokens_per_example": sum(g.completion_tokens for g in gens) / n if n else 0.0,
        "generation_s": gen_s,
        "max_new_tokens": max_new_tokens,
        "precision": precision,
        "weights": loaded.weights,
        **answer_format(constraint),
    }
    metrics.update(scores.extra)
    return EvalResult(metrics, rows)


def generate_greedy(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    constraint: Constraint | None = None,
    on_done: Callable[[int], None] | None = None,
    tools: Sequence[Any] | None = None,
) -> list[Completion]:
    """Greedy answers to chat prompts (rendered as in training, with each prompt's `tools`), text stripped: one
    `generate_batch` at temperature 0 on an engine over `loaded`."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    ids = [render_prompt(loaded.tokenizer, p, tools[i] if tools else None) for i, p in enumerate(prompts)]
    engine = LocalEngine(loaded, precision=precision, max_batch_rows=batch_size)
    try:
        gens = engine.generate_batch(ids, loaded.model_id, SamplingParams(max_new_tokens, 0.0, constraint=constraint),
                                     on_done)
    finally:
        engine.close()
    return [replace(g, text=g.text.strip()) for g in gens]


def choice_tokens(tokenizer: Any, choices: Sequence[str]) -> int:
    """New tokens an answer held to `choices` may need: the longest choice and the end of turn."""
    return max(len(tokenizer.encode(c, add_special_tokens=False)) for c in choices) + 1


def _room_for_choices(tokenizer: Any, constraint: Constraint | None, max_new_tokens: int,
                      log: Callable[[str], None]) -> int:
    """Answers held to a choice list get choice_tokens: a shorter limit would cut the long
    choices into invalid answers."""
    if constraint is None or constraint.kind != "choice":
        return max_new_tokens
    need = choice_tokens(tokenizer, json.loads(constraint.source))
    if max_new_tokens < need:
        log(f"--max-new-tokens {max_new_tokens} is too few for the longest choice ({need - 1} tokens and the end "
            f"of turn); answers get {need}")
        return need
    return max_new_tokens


def answer_format(constraint: Constraint | None) -> dict[str, Any]:
    """What metrics.json and compare.json say the answers were held to (None: free text)."""
    record: dict[str, Any] = {"json_schema": None, "choices": None}
    if constraint is not None:
        kind, value = next(iter(constraint.record().items()))
        record["choices" if kind == "choice" else kind] = value
    return record


def _last_user(prompt: Sequence[Message]) -> str:
    users = [m.content for m in prompt if m.role == "user"]
    return users[-1] if users else ""


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def _progress(total: int, log: Callable[[str], None]) -> Callable[[int], None]:
    """Log progress about every 10% of the rows (called as each row finishes)."""
    done = [0, 0]
    t0 = time.perf_counter()

    def on_done(_row: int) -> None:
        done[0] += 1
        if done[0] * 10 // max(total, 1) > done[1] or done[0] == total:
            done[1] = done[0] * 10 // max(total, 1)
            rate = done[0] / max(time.perf_counter() - t0, 1e-9)
            log(f"  generated {done[0]}/{total} ({rate:.1f} examples/s)")

    return on_done


def write_eval(out: Path, result: EvalResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as fh:
        for row in result.predictions:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / EVAL_METRICS_FILE).write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n")
    result.out = out


def load_eval(path: Path) -> EvalResult:
    """Read back an evaluation directory written by write_eval."""
    metrics = json.loads((path / EVAL_METRICS_FILE).read_text())
    preds = []
    pred_file = path / PREDICTIONS_FILE
    if pred_file.is_file():
        preds = [json.loads(line) for line in pred_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return EvalResult(metrics, preds, path)


# ----------------------------------------------------------------------------- printing


def format_score(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name in ("loss", "perplexity"):
        return f"{value:.3f}"
    return f"{100 * value:.1f}%"


def print_eval(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.metrics
    table = Table("metric", "value", title=f"{m['model']}" + (f" + {m['adapter']}" if m.get("adapter") else ""))
    for name, value in m["scores"].items():
        table.add_row(name, format_score(name, value))
    table.add_row("loss (reference answers)", format_score("loss", m.get("loss")))
    table.add_row("perplexity", format_score("perplexity", m.get("perplexity")))
    table.add_row("latency per example", f"{1000 * m['latency_s_per_example']:.0f} ms (batched)")
    table.add_row("prompt tokens per example", f"{m['prompt_tokens_per_example']:.1f}")
    table.add_row("completion tokens per example", f"{m['completion_tokens_per_example']:.1f}")
    table.add_row("examples", str(m["n_examples"]))
    Console().print(table)
    if m.get("invalid_labels"):
        top = ", ".join(f"{k!r} x{v}" for k, v in list(m["invalid_labels"].items())[:5])
        Console().print(f"invalid labels (outside the label set): {top}")
