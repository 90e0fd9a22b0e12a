"""trackio: local-first tracking (a SQLite file per project under TRACKIO_DIR, by default
~/.cache/huggingface/trackio), shown by `trackio show`.

    tunesmith train --data train.jsonl --report-to trackio --tracking-project demo && trackio show --project demo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.tracking.base import TrackingSettings


class TrackioSink:
    name = "trackio"

    def __init__(self, settings: TrackingSettings, config: dict[str, Any]):
        import trackio

        resume = "allow" if settings.resume_ids.get(self.name) else "never"
        # No CPU/GPU sampling threads: the run reports the numbers training derives.
        self.run = trackio.init(project=settings.project, name=settings.run_name, config=config, resume=resume,
                                auto_log_cpu=False, auto_log_gpu=False, embed=False)
        self.run_id = settings.run_name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.log({f"final/{k}": v for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def log_artifact(self, path: Path, name: str) -> None:
        self.run.log_artifact(path, name=name, type="model")

    def finish(self, failed: bool) -> None:
        self.run.finish()
