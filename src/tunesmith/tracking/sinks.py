"""`Tracking`: the sinks one run reports to, each failure contained.

A sink that raises is reported once through `warn`, recorded in RUN/tracking.json (which
the jobs worker turns into one warning event) and dropped; the run goes on without it.

    python -c "from tunesmith.tracking.sinks import read_tracking_file; print(read_tracking_file('runs/first'))"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import ConfigError
from tunesmith.fileio import write_atomically
from tunesmith.runs import TRACKING_FILE
from tunesmith.tracking.base import TRACKERS, MetricSink, TrackingSettings
from tunesmith.tracking.mlflow_sink import MlflowSink
from tunesmith.tracking.tensorboard_sink import TensorBoardSink
from tunesmith.tracking.trackio_sink import TrackioSink
from tunesmith.tracking.wandb_sink import WandbSink

SINKS = {"wandb": WandbSink, "mlflow": MlflowSink, "tensorboard": TensorBoardSink, "trackio": TrackioSink}
"""Each module imports its library only when its sink starts a run."""


def open_sink(name: str, settings: TrackingSettings, config: dict[str, Any]) -> MetricSink:
    """Start the tracker's run."""
    if name not in SINKS:
        raise ConfigError(f"unknown tracker '{name}'; known: {', '.join(TRACKERS)}")
    return SINKS[name](settings, config)


def read_tracking_file(run_dir: Path) -> dict[str, Any]:
    """RUN/tracking.json ({"runs": {tracker: run id}, "failed": {tracker: message}}), or {}."""
    try:
        return json.loads((Path(run_dir) / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}


class Tracking:
    """The sinks a run reports to; `names` are started in order, each failure contained."""

    def __init__(self, names: list[str] | tuple[str, ...], settings: TrackingSettings, config: dict[str, Any],
                 warn: Callable[[str], None], opener: Callable[..., MetricSink] = open_sink):
        self.settings, self.warn = settings, warn
        self.sinks: list[MetricSink] = []
        self.failed: dict[str, str] = {}
        self.runs: dict[str, str] = {}
        for name in names:
            try:
                sink = opener(name, settings, config)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._fail(name, "could not start", exc)
                continue
            self.sinks.append(sink)
            self.runs[name] = sink.run_id
        self._write()

    def log_metrics(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: every number in it except the step, at its step."""
        numbers = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each("log_metrics", numbers, int(row["step"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._each("log_summary", summary)

    def log_artifact(self, path: Path, name: str) -> None:
        self._each("log_artifact", Path(path), name)

    def finish(self, failed: bool = False) -> None:
        self._each("finish", failed)
        self.sinks = []

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001
                self.sinks.remove(sink)
                self._fail(sink.name, f"failed in {method}", exc)
                self._write()

    def _fail(self, name: str, what: str, exc: BaseException) -> None:
        message = f"{name} {what} ({type(exc).__name__}: {str(exc).strip()[:300]}); training goes on without it"
        self.failed[name] = message
        self.warn(f"warning: tracker {message}")

    def _write(self) -> None:
        if self.runs or self.failed:
            write_atomically(self.settings.run_dir / TRACKING_FILE,
                             json.dumps({"runs": self.runs, "failed": self.failed}, indent=2) + "\n")
