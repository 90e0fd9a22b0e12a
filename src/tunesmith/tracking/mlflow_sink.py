"""MLflow: one MLflow run per training run, in the experiment named by --tracking-project.

Works with any tracking URI MLflow takes: a local SQLite store
(`sqlite:///mlflow.db`, which `mlflow ui --backend-store-uri` shows), a server, or MLflow's
default (MLFLOW_TRACKING_URI). The client object is used, never MLflow's global active run.

    tunesmith train --data train.jsonl --report-to mlflow --mlflow-tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunesmith.tracking.base import TrackingSettings, flatten

MAX_PARAM_CHARS = 6000
"""MLflow refuses longer parameter values."""


def local_artifact_location(tracking_uri: str | None) -> str | None:
    """For a SQLite store, artifacts go in `mlartifacts/` beside the database file, not in the
    folder the trainer happens to run in (MLflow's default: ./mlruns under the current
    directory, e.g. a jobs server's). Anything else: MLflow decides (a server serves its own)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()
    return (database.parent / "mlartifacts").as_uri()


class MlflowSink:
    name = "mlflow"

    def __init__(self, settings: TrackingSettings, config: dict[str, Any]):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        resume_id = settings.resume_ids.get(self.name)
        if resume_id:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(settings.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            settings.project, artifact_location=local_artifact_location(settings.mlflow_tracking_uri))
        tags = {t: "true" for t in settings.tags}
        self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name, tags=tags).info.run_id
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items() if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=[Param(p.key, p.value[:MAX_PARAM_CHARS])
                                                       for p in params[i:i + 100]])
        self.client.log_batch(self.run_id, tags=[RunTag("tunesmith.run_dir", str(settings.run_dir))])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")

    def log_artifact(self, path: Path, name: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), name)
        else:
            self.client.log_artifact(self.run_id, str(path), name)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
