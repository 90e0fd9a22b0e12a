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
from tunesmith.runs import RUN_FILE, TRACKING_FILE, read_run_json
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
        """RUN/tracking.json: this attempt's run ids, and every failure of this or an earlier attempt."""
        if self.runs or self.failed:
            earlier = read_tracking_file(self.settings.run_dir)
            runs = {**earlier.get("runs", {}), **self.runs}
            failed = {**earlier.get("failed", {}), **self.failed}
            write_atomically(self.settings.run_dir / TRACKING_FILE,
                             json.dumps({"runs": runs, "failed": failed}, indent=2) + "\n")


def run_dir_of(adapter: Path) -> Path | None:
    """The training run an adapter path belongs to: RUN itself, RUN/adapter or RUN/checkpoints/step-N."""
    adapter = Path(adapter)
    for candidate in (adapter, adapter.parent, adapter.parent.parent):
        if (candidate / RUN_FILE).is_file():
            return candidate
    return None


def log_after_training(run_dir: Path, metrics: dict[str, float], warn: Callable[[str], None]) -> list[str]:
    """Numbers measured after the run ended (a job's evaluation, `tunesmith eval` of its
    adapter) into the runs its trackers opened, continued by their ids in RUN/tracking.json,
    at the run's last step. A run that reported to no tracker (or none that started) is left
    alone. Returns the trackers that were sent the numbers."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        return []
    info = read_run_json(run_dir)
    cfg = info.get("config", {})
    started = read_tracking_file(run_dir).get("runs", {})
    names = [n for n in cfg.get("report_to") or [] if n in started]
    if not names:
        return []
    settings = TrackingSettings(
        run_dir=run_dir, project=cfg.get("tracking_project") or "tunesmith",
        run_name=cfg.get("run_name") or run_dir.name, tags=tuple(cfg.get("tracking_tags") or ()),
        wandb_entity=cfg.get("wandb_entity"), mlflow_tracking_uri=cfg.get("mlflow_tracking_uri"),
        tensorboard_dir=Path(cfg["tensorboard_dir"]) if cfg.get("tensorboard_dir") else None, resume_ids=started)
    config = {k: v for k, v in info.items() if k not in ("status", "metrics")}  # as training sent it
    tracking = Tracking(names, settings, config, warn)
    tracking.log_metrics({"step": (info.get("metrics") or {}).get("steps") or 0, **metrics})
    tracking.finish()
    return [sink for sink in names if sink not in tracking.failed]
