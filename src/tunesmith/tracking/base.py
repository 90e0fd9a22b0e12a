"""The metric sink every tracker implements, and what each needs to open its run.

    python -c "from tunesmith.tracking.base import TRACKERS; print(TRACKERS)"
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tunesmith.errors import ConfigError

TRACKERS = ("wandb", "mlflow", "tensorboard", "trackio")
"""The trackers `--report-to` accepts, each an extra of the same name that installs the module of the same name."""


class MetricSink(Protocol):
    """One tracker a run reports to. Every call may raise; `Tracking` contains it."""

    name: str
    run_id: str
    """The tracker's id of this run, kept in RUN/tracking.json so `--resume` continues it."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def log_artifact(self, path: Path, name: str) -> None: ...

    def finish(self, failed: bool) -> None: ...


@dataclass(frozen=True)
class TrackingSettings:
    """What every sink needs to open its run (from TrainConfig's tracking fields)."""

    run_dir: Path
    project: str
    run_name: str
    tags: tuple[str, ...] = ()
    wandb_entity: str | None = None
    mlflow_tracking_uri: str | None = None
    tensorboard_dir: Path | None = None
    resume_ids: dict[str, str] = field(default_factory=dict)
    """tracker -> run id of an earlier attempt of this run (RUN/tracking.json)."""


def missing_trackers(names: list[str] | tuple[str, ...]) -> list[str]:
    """A sentence per tracker in `names` whose library is not installed."""
    return [f"--report-to {n} needs the {n} package, which is not installed: pip install 'tunesmith[{n}]'"
            for n in names if importlib.util.find_spec(n) is None]


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError naming every tracker in `names` that cannot report (library missing)."""
    problems = missing_trackers(names)
    if problems:
        raise ConfigError("; ".join(problems))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"config": {"lora_rank": 16}} -> {"config.lora_rank": 16} (for trackers with flat params)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
