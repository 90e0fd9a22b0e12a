"""`tunesmith sweep`: a hyperparameter search whose trials are jobs on the durable queue.

    tunesmith sweep -c sweep.yaml --workers 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.serve import DB_HELP


def sweep_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="The sweep's YAML: base, search_space, sampler, trials, "
                                "parallelism, objective, pruner (docs/tracking.md#sweeps)."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP + " The optuna study lives there too."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker threads in this process (default: the "
                                          "sweep's parallelism; 0 when `tunesmith worker`s elsewhere run the trials)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where the table, best.yaml and the best adapter go "
                                       "(default: sweeps/<name>)."),
) -> None:
    """Search hyperparameters with optuna; each trial is a fine-tuning job, N workers run N at once."""
    from tunesmith.errors import UsageError
    from tunesmith.jobs.store import open_store
    from tunesmith.jobs.sweep import results_table, run_sweep
    from tunesmith.jobs.sweep_config import load_sweep_config
    from tunesmith.tracking.base import check_trackers

    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UsageError("tunesmith sweep needs optuna, which is not installed: pip install 'tunesmith[sweep]'")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    cfg = load_sweep_config(config)
    check_trackers(cfg.base_config().report_to)
    store = open_store(db)
    results = run_sweep(cfg, store, out or Path("sweeps") / cfg.name, workers=workers)
    typer.echo(results_table(results))
