"""`tunesmith compare --train-adapter`: train an adapter on the training file with
`tunesmith train`'s defaults, then measure it beside the prompting strategies. Training
on demand chains two stages, so it lives here; the measuring is `evaluate.comparison`.

    tunesmith compare --train train.csv --test test.csv --train-adapter --out cmp
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import UsageError
from tunesmith.evaluate import comparison
from tunesmith.evaluate.evaluation import other_column
from tunesmith.train.config import TrainConfig
from tunesmith.train.run import train as run_training


def compare(
    model: str | Path | None,
    train: str | Path,
    test: str | Path,
    adapter: str | Path | None = None,
    train_adapter: bool = False,
    out: str | Path | None = None,
    format: str | None = None,
    input_column: str = "text",
    output_column: str | None = None,
    system: str | None = None,
    log: Callable[[str], None] = print,
    **measure: Any,
) -> comparison.Comparison:
    """evaluate.comparison.compare, with `train_adapter` training the fine-tuned side first;
    `measure` takes compare's other options (shots, metric, teacher_model, ...)."""
    if adapter is not None and train_adapter:
        raise UsageError("give either --adapter or --train-adapter, not both")
    comparison.check_options(measure.get("shots", 5), measure.get("weights", "fp32"))  # before any training is spent
    if train_adapter:
        if output_column is None and (format or Path(train).suffix.lower().lstrip(".")) in ("csv", "tsv", "tab"):
            output_column = other_column(Path(train), input_column)  # the column compare itself uses
        adapter = _train_adapter(model, train, out, format, input_column, output_column, system, log)
    return comparison.compare(
        model, train, test, adapter=adapter, out=out, format=format, input_column=input_column,
        output_column=output_column, system=system, log=log, **measure,
    )


def _train_adapter(model, train, out, format, input_column, output_column, system, log) -> Path:
    """Train an adapter on the training file with `tunesmith train`'s default settings."""
    run_dir = (Path(out) if out is not None else Path(".")) / "adapter-run"
    wanted = {
        "model": str(model) if model else None, "data": str(train), "format": format,
        "input_column": input_column, "output_column": output_column, "system": system, "out": str(run_dir),
    }
    log(f"training an adapter on {train} with default settings into {run_dir}")
    result = run_training(TrainConfig(**{k: v for k, v in wanted.items() if v is not None}))
    return result.out_dir
