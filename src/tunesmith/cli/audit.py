"""`tunesmith audit`: the data's content checked before training (duplicates, leakage,
conflicting and suspect labels, imbalance, lengths, personal data).

    tunesmith audit data/banking77/train.csv --test data/banking77/test.csv \
        --input-column text --output-column category --fix train.clean.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.common import PROMPT_COLUMN_HELP, log
from tunesmith.cli.data import ANSWER_COLUMN_HELP, FORMAT_HELP, SYSTEM_HELP, build_columns
from tunesmith.models.registry import DEFAULT_MODEL


def audit_cmd(
    train: Path = typer.Argument(..., help="Training data file (.jsonl, .csv, .tsv)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Test file: its rows are looked for in the training file (leakage)."),
    validation: Optional[Path] = typer.Option(None, "--validation", help="Validation file: looked for in the training file too."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model whose chat template measures lengths in tokens."),
    threshold: float = typer.Option(0.8, "--threshold", help="Jaccard similarity (character 3-grams) from which two prompts are near duplicates."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary."),
    report: Optional[Path] = typer.Option(None, "--report", help="Run folder: write audit.json there, which `tunesmith report` shows as a section."),
    fix: Optional[Path] = typer.Option(None, "--fix", help="Write a cleaned copy of the training file here (never the input)."),
    fix_labels: Optional[str] = typer.Option(None, "--fix-labels", help="With --fix: drop or relabel suspect labels at or above --min-confidence."),
    min_confidence: float = typer.Option(0.9, "--min-confidence", help="Confidence from which --fix-labels acts on a suspect label."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    input_column: Optional[str] = typer.Option(None, "--input-column", help=PROMPT_COLUMN_HELP),
    output_column: Optional[str] = typer.Option(None, "--output-column", help=ANSWER_COLUMN_HELP),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
) -> None:
    """Audit the data's content: duplicates, leakage, conflicting and suspect labels, imbalance, PII (exit 1 on leakage)."""
    import json

    from rich.console import Console

    from tunesmith.data.audit import audit_data
    from tunesmith.data.audit_summary import print_audit
    from tunesmith.data.audit_fix import LABEL_ACTIONS, print_fix, write_fixed
    from tunesmith.data.near_duplicates import require_audit_packages
    from tunesmith.data.validate import load_tokenizer_quick
    from tunesmith.errors import UsageError
    from tunesmith.models.registry import resolve_model
    from tunesmith.runs import AUDIT_FILE

    if fix_labels is not None and (fix is None or fix_labels not in LABEL_ACTIONS):
        raise UsageError(f"--fix-labels takes {' or '.join(LABEL_ACTIONS)} and needs --fix OUT, got {fix_labels!r}")
    require_audit_packages()
    columns = build_columns(input_column, output_column, system)
    tokenizer = load_tokenizer_quick(resolve_model(model))
    result = audit_data(train, test=test, validation=validation, format=format, columns=columns,
                        tokenizer=tokenizer, threshold=threshold, log=log)
    fixed = write_fixed(result, fix, columns, fix_labels, min_confidence) if fix is not None else None
    data = result.to_dict()
    if fixed is not None:
        data["fix"] = fixed.to_dict()
    if report is not None:
        if not report.is_dir():
            raise UsageError(f"--report {report} is not a folder; give the run folder that `tunesmith report` reads")
        (report / AUDIT_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=1))
        log(f"audit: {report / AUDIT_FILE} (tunesmith report {report} shows it)")
    if json_out:
        typer.echo(json.dumps(data, ensure_ascii=False))
    else:
        console = Console(highlight=False, soft_wrap=True)
        print_audit(result, console)
        if fixed is not None:
            print_fix(fixed, console)
    raise typer.Exit(0 if result.ok else 1)
