"""Weights & Biases: one W&B run per training run, its files under RUN/wandb/.

W&B's own environment decides online or offline (`WANDB_MODE=offline` writes the run
files only; `wandb sync RUN/wandb/offline-run-*` uploads them later).

    WANDB_MODE=offline tunesmith train --data train.jsonl --report-to wandb --tracking-project demo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.tracking.base import TrackingSettings


class WandbSink:
    name = "wandb"

    def __init__(self, settings: TrackingSettings, config: dict[str, Any]):
        import wandb

        resume_id = settings.resume_ids.get(self.name)
        # console="off": tunesmith's own progress lines stay on the terminal as they are
        # (W&B would otherwise wrap stdout and stderr to copy them into the run).
        self.run = wandb.init(
            project=settings.project, entity=settings.wandb_entity, name=settings.run_name,
            tags=list(settings.tags) or None, config=config, dir=str(settings.run_dir),
            id=resume_id, resume="allow" if resume_id else None, reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step < self.run.step:  # a continued run (online W&B knows its last step): W&B drops older steps
            self.run.summary.update(metrics)
            return
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def log_artifact(self, path: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{name}-{self.run.id}", type="model")
        artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
