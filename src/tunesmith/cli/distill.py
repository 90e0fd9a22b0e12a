"""`tunesmith distill`: a teacher model answers your prompts, written as a chat training file.

    tunesmith distill --prompts prompts.txt --teacher-model gpt-4o-mini --out train.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import PROMPT_COLUMN_HELP, log
from tunesmith.models.registry import DEFAULT_MODEL


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
    input_column: str = typer.Option("text", "--input-column", help=PROMPT_COLUMN_HELP),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Student model whose chat template validates the output."),
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
        max_retries=max_retries, timeout_s=timeout_s, log=log,
    )
    print_summary(result, Console(highlight=False, soft_wrap=True))
    raise typer.Exit(0 if result.ok else 1)
