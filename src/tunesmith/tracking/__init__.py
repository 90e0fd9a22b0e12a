"""Where a run's numbers go besides metrics.jsonl: the trackers users already watch.

One small Protocol, `MetricSink`, and one implementation per tracker (W&B, MLflow,
TensorBoard, trackio), each behind an optional extra (`pip install 'tunesmith[wandb]'`).
`Tracking` holds the sinks a run reports to and keeps training going when one fails:
the first error of a sink is one warning (and a line in RUN/tracking.json, which the jobs
worker turns into a warning event), and that sink is dropped.

    WANDB_MODE=offline tunesmith train --data train.jsonl --report-to wandb,tensorboard
"""
