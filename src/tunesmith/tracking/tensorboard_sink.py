"""TensorBoard: event files under RUN/tensorboard (or --tensorboard-dir), one scalar
series per metric, the resolved config as text.

    tunesmith train --data train.jsonl --report-to tensorboard && tensorboard --logdir runs/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.tracking.base import TrackingSettings

DEFAULT_SUBDIR = "tensorboard"


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, settings: TrackingSettings, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(settings.tensorboard_dir or settings.run_dir / DEFAULT_SUBDIR)
        self.run_id = str(self.log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", 0)

    def log_artifact(self, path: Path, name: str) -> None:
        """TensorBoard keeps no artifacts; the adapter stays in the run directory."""

    def finish(self, failed: bool) -> None:
        self.writer.close()
