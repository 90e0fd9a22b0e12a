"""`tunesmith eval`, `compare`, `report` and `demo`: measuring a model or adapter on
held-out data, against prompting strategies, and writing it up.

    tunesmith eval --adapter runs/first --data test.jsonl --report
    tunesmith compare --train train.jsonl --test test.jsonl --adapter runs/first
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import WEIGHTS_HELP, log
from tunesmith.cli.graders import JUDGE_API_KEY_HELP, JUDGE_BASE_URL_HELP
from tunesmith.models.registry import DEFAULT_MODEL

# eval and compare share these options, so they say the same thing on both.
MODEL_HELP = "Base model: registry name, HF directory or .gguf."
METRIC_HELP = "auto (picked from the references), label, exact, json, rouge or tool_call."
MAX_NEW_TOKENS_HELP = "Most tokens generated per example."
BATCH_SIZE_HELP = "Examples generated together."
PRECISION_HELP = "auto (fp32 on a CPU, bf16 autocast on a CUDA GPU that has it), fp32 or bf16."
FORMAT_HELP = "Data format; detected when omitted."
INPUT_COLUMN_HELP = "CSV/TSV: column holding the input."
OUTPUT_COLUMN_HELP = "CSV/TSV: column holding the reference answer. Default: the only other column."
REPORT_HELP = "Also write report.html into the output folder."
JSON_MODE_HELP = "Hold every answer to one JSON object, as the server's JSON mode does (response_format json_object)."
JSON_SCHEMA_HELP = "Hold every answer to one JSON value of this JSON Schema file (structured outputs, as the server's json_schema)."
CHOICES_HELP = "Hold every answer to one of these comma-separated strings (e.g. a classification's labels), as the server's guided_choice."


def _answer_constraint(json_mode: bool, path: Optional[Path], choices: Optional[str]):
    """What answers are held to: --json-schema's schema, --json-mode's any object, --choices'
    strings, or None; checked (OpenAI's limits, what llguidance can compile) before any model loads."""
    import json

    from tunesmith.errors import UsageError
    from tunesmith.generate.constraints import ANY_OBJECT, Constraint, ConstraintError, check_grammar

    given = [flag for flag, value in (("--json-mode", json_mode), ("--json-schema", path), ("--choices", choices))
             if value]
    if len(given) > 1:
        raise UsageError(f"give one of {' and '.join(given)}, not both")
    if not given:
        return None
    try:
        if choices:
            constraint = Constraint.choice([c.strip() for c in choices.split(",") if c.strip()])
        elif path is None:
            constraint = Constraint.json_schema(ANY_OBJECT)
        else:
            try:
                schema = json.loads(Path(path).read_text())
            except OSError as exc:
                raise UsageError(f"--json-schema {path}: cannot read it ({exc.strerror})") from None
            except ValueError as exc:
                raise UsageError(f"--json-schema {path} is not JSON ({exc}); give a JSON Schema file") from None
            constraint = Constraint.json_schema(schema)
        check_grammar(constraint)
    except ConstraintError as exc:  # names the limit or keyword
        raise UsageError(f"{given[0]}{' ' + str(path) if path else ''}: {exc}") from None
    return constraint


def _default_out(adapter: Optional[Path], kind: str) -> Path:
    """RUN/eval for a run directory, else a fresh timestamped folder here."""
    import time

    from tunesmith import runs

    if adapter is not None and kind == "eval" and (
            (adapter / runs.ADAPTER_DIR).is_dir() or (adapter / runs.CHECKPOINTS_DIR).is_dir()):
        return adapter / runs.EVAL_DIR
    return Path(f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Held-out examples with reference answers (.jsonl, .csv, .tsv)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Run directory or adapter directory to put on the base."),
    metric: str = typer.Option("auto", "--metric", help=METRIC_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for predictions.jsonl and metrics.json (default: RUN/eval for a run, else eval-<time>)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help=MAX_NEW_TOKENS_HELP),
    batch_size: int = typer.Option(16, "--batch-size", help=BATCH_SIZE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    weights: str = typer.Option("fp32", "--weights", help=WEIGHTS_HELP),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    input_column: str = typer.Option("text", "--input-column", help=INPUT_COLUMN_HELP),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=OUTPUT_COLUMN_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the one the adapter's run trained with)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples."),
    report: bool = typer.Option(False, "--report", help=REPORT_HELP),
    json_mode: bool = typer.Option(False, "--json-mode", help=JSON_MODE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", "--schema", help=JSON_SCHEMA_HELP),
    choices: Optional[str] = typer.Option(None, "--choices", help=CHOICES_HELP),
    grader: Optional[Path] = typer.Option(
        None, "--grader", help="Also score each answer with this grader (JSON, OpenAI's shape); the item is "
                               "{input, reference, line}. Reports the mean and per-row scores."),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help=JUDGE_BASE_URL_HELP),
    judge_api_key: Optional[str] = typer.Option(None, "--judge-api-key", help=JUDGE_API_KEY_HELP),
    to_trackers: bool = typer.Option(True, "--to-trackers/--no-trackers", help="Send the scores to the trackers the "
                                     "adapter's run reported to (as eval/<data file>/<score>, at its last step)."),
    with_loss: bool = typer.Option(True, "--loss/--no-loss", help="Also measure the loss and perplexity on the "
                                   "reference answers: a second pass over every row (about as long as generating "
                                   "short answers); --no-loss when only the scores are wanted."),
) -> None:
    """Evaluate a model or adapter on held-out data."""
    from tunesmith.evaluate.evaluation import evaluate, print_eval, write_eval

    constraint = _answer_constraint(json_mode, json_schema, choices)
    spec = None
    if grader is not None:  # a bad grader fails before the model loads
        from tunesmith.graders.files import load_grader

        spec = load_grader(grader)
    out = out or _default_out(adapter, "eval")
    result = evaluate(
        model, data, adapter=adapter, metric=metric, out=out, max_new_tokens=max_new_tokens,
        batch_size=batch_size, precision=precision, format=format, input_column=input_column,
        output_column=output_column, system=system, limit=limit, constraint=constraint, weights=weights, log=log,
        with_loss=with_loss,
    )
    print_eval(result)
    if spec is not None:
        from tunesmith.evaluate.grading import grade_eval
        from tunesmith.graders.files import format_summary
        from tunesmith.graders.judge import Endpoint

        summary = grade_eval(result, spec, Endpoint(judge_base_url, judge_api_key))
        for row in result.predictions:
            why = f"  grader error: {row['grader_error']}" if row["grader_error"] else ""
            typer.echo(f"line {row['line']}: {row['grader_reward']:.4f}{why}")
        typer.echo(format_summary(summary))
        write_eval(out, result)
    log(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    if adapter is not None and to_trackers:
        _send_to_trackers(adapter, data, result.metrics)
    if report:
        from tunesmith.evaluate.report import build_report

        log(f"report: {build_report(out)}")


def _send_to_trackers(adapter: Path, data: Path, metrics: dict) -> None:
    """The scores into the runs the adapter's training opened in its trackers, if any."""
    import re

    from tunesmith.tracking.sinks import log_after_training, run_dir_of

    run_dir = run_dir_of(adapter)
    if run_dir is None:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem) or "data"
    numbers = {f"eval/{name}/{k}": float(v) for k, v in (metrics.get("scores") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics.get("loss") is not None:
        numbers[f"eval/{name}/loss"] = float(metrics["loss"])
    sent = log_after_training(run_dir, numbers, warn=log)
    if sent:
        log(f"sent {len(numbers)} scores to {', '.join(sent)} (the runs {run_dir} reported to)")


def compare_cmd(
    train: Path = typer.Option(..., "--train", help="Training examples (the few-shot and retrieval pool; --train-adapter trains on them)."),
    test: Path = typer.Option(..., "--test", help="Held-out examples every strategy is measured on."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Fine-tuned run or adapter directory to include."),
    train_adapter: bool = typer.Option(False, "--train-adapter", help="Train an adapter on --train with default settings and include it."),
    shots: int = typer.Option(5, "--shots", help="Examples in the few-shot and retrieval prompts."),
    price_per_million: float = typer.Option(0.10, "--price-per-million", help="Price of one million tokens, for the cost column."),
    metric: str = typer.Option("auto", "--metric", help=METRIC_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for compare.json and each strategy's predictions (default: compare-<time>)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help=MAX_NEW_TOKENS_HELP),
    batch_size: int = typer.Option(16, "--batch-size", help=BATCH_SIZE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    weights: str = typer.Option("fp32", "--weights", help=WEIGHTS_HELP),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    input_column: str = typer.Option("text", "--input-column", help=INPUT_COLUMN_HELP),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=OUTPUT_COLUMN_HELP),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt for the prompting strategies (and a trained adapter)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N test examples."),
    report: bool = typer.Option(False, "--report", help=REPORT_HELP),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Also measure this teacher model (OpenAI-compatible endpoint), asked each test prompt as distill asks it."),
    teacher_base_url: Optional[str] = typer.Option(None, "--teacher-base-url", help="The teacher's endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI's)."),
    teacher_api_key: Optional[str] = typer.Option(None, "--teacher-api-key", help="The teacher's API key (default: $OPENAI_API_KEY); never written."),
    teacher_price_per_million: Optional[float] = typer.Option(None, "--teacher-price-per-million", help="The teacher's price per million tokens (default: --price-per-million)."),
    json_mode: bool = typer.Option(False, "--json-mode", help=JSON_MODE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", "--schema", help=JSON_SCHEMA_HELP),
    choices: Optional[str] = typer.Option(None, "--choices", help=CHOICES_HELP),
) -> None:
    """Zero-shot vs few-shot vs retrieval few-shot vs fine-tuned (vs a teacher), on the same test set."""
    from tunesmith.evaluate.comparison import print_comparison
    from tunesmith.flows.compare import compare

    constraint = _answer_constraint(json_mode, json_schema, choices)
    out = out or _default_out(None, "compare")
    result = compare(
        model, train, test, adapter=adapter, train_adapter=train_adapter, shots=shots,
        price_per_million=price_per_million, metric=metric, out=out, max_new_tokens=max_new_tokens,
        batch_size=batch_size, precision=precision, format=format, input_column=input_column,
        output_column=output_column, system=system, limit=limit, teacher_model=teacher_model,
        teacher_base_url=teacher_base_url, teacher_api_key=teacher_api_key,
        teacher_price_per_million=teacher_price_per_million, constraint=constraint, weights=weights, log=log,
    )
    print_comparison(result)
    log(f"wrote {out / 'compare.json'}")
    if report:
        from tunesmith.evaluate.report import build_report

        log(f"report: {build_report(out)}")


def report_cmd(
    run: Path = typer.Argument(..., help="A training run, eval or compare folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN/report.html)."),
) -> None:
    """Write a self-contained HTML report for a run."""
    from tunesmith.evaluate.report import build_report

    typer.echo(f"report: {build_report(run, out)}")


def demo_cmd(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Folder everything the demo writes goes under."),
    budget_min: float = typer.Option(
        13.0, "--budget-min", min=0.5,
        help="Minutes the demo may take; it trains as many steps as fit (at most 290), from the speed it measures here."),
    steps: Optional[int] = typer.Option(
        None, "--steps", min=1, help="Train exactly this many steps instead of what fits the budget."),
) -> None:
    """The whole lifecycle on banking77: pull, validate, zero-shot, fine-tune, evaluate, report."""
    from tunesmith.flows.demo import run_demo

    run_demo(out, log=typer.echo, budget_min=budget_min, steps=steps)
