"""Request bodies and response objects of the files and fine-tuning jobs API, in OpenAI's shape.

Requests are pydantic models that reject unknown keys; responses are built from store rows
by the `*_object` functions, with OpenAI's field names and order, so the official `openai`
client parses them unchanged.

    python -c "from tunesmith.serve.jobs_protocol import JobCreate; print(JobCreate.model_json_schema())"
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.protocol import Text
from tunesmith.train.config import RL_BOUNDS

Auto = Literal["auto"]
HYPERPARAMETER_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier", "n_workers", "gpus_per_worker")
"""What a job shows under `hyperparameters` (beta is shown under method.dpo)."""


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = Field("auto", description="Passes over the training file.")
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = Field("auto", description="Examples per optimizer step.")
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = Field(
        "auto", description="Scales tunesmith's default learning rate for the method (LoRA 1e-3, DPO 1e-4)."
    )
    n_workers: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="Training processes (data parallel): Ray Train workers with `--executor ray`, else "
                          "`train --nproc` on the worker's machine (default 1)."
    )
    gpus_per_worker: Annotated[float, Field(ge=0, le=64)] | None = Field(
        None, description="GPUs each Ray Train worker holds (`--executor ray`; default 0: CPUs with gloo)."
    )


class DpoHyperparameters(Hyperparameters):
    """The supervised hyperparameters plus DPO's beta (OpenAI's DPO hyperparameters)."""

    beta: Auto | Annotated[float, Field(gt=0, le=100)] = Field(
        "auto", description="DPO beta: how strongly the tuned model is held to the base (auto: 0.1)."
    )


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters, then tunesmith's own (GRPO's knobs)."""

    compute_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = Field(
        "auto", description="Scales the answers sampled per prompt (group_size 4 at 1.0); ignored when group_size is given.")
    eval_interval: Auto | Annotated[int, Field(ge=1)] = Field(
        "auto", description="Steps between held-out reward measurements on the validation file (auto: once per epoch).")
    eval_samples: Auto | Annotated[int, Field(ge=1, le=RL_BOUNDS["eval_samples"][1])] = Field(
        "auto", description="Answers sampled per validation prompt for the held-out reward (auto: 1).")
    group_size: Auto | Annotated[int, Field(ge=2, le=RL_BOUNDS["group_size"][1])] = Field(
        "auto", description="Answers sampled per prompt (auto: 4).")
    kl_coef: Auto | Annotated[float, Field(ge=0, le=RL_BOUNDS["kl_coef"][1])] = Field(
        "auto", description="KL penalty to the policy as training started: the fine-tuned model given as "
        "`model`, else the base model (auto: 0, no penalty).")
    max_completion_tokens: Auto | Annotated[int, Field(ge=1, le=RL_BOUNDS["max_completion_tokens"][1])] = Field(
        "auto", description="Longest sampled answer in tokens (auto: 64).")
    temperature: Auto | Annotated[float, Field(ge=0, le=RL_BOUNDS["temperature"][1])] = Field(
        "auto", description="Sampling temperature (auto: 1.0).")


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any] = Field(description="The grader that scores each sampled answer, in OpenAI's shape "
                                               "(string_check, text_similarity, python, score_model, label_model, multi).")
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        description="supervised (chat, prompt/completion or alpaca files), dpo (preference pairs: "
                    "prompt/chosen/rejected or input/preferred_output/non_preferred_output) or reinforcement "
                    "(prompt rows: messages plus the fields the grader reads).")
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


Name = Annotated[str, Field(max_length=128)]
"""A tracker's project, run or entity name (W&B's limit for a project name is 128 characters)."""
Tags = Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)]
"""At most 64 tags of at most 64 characters (W&B's limit per tag)."""


class WandbIntegration(BaseModel):
    """OpenAI's W&B integration: the run tunesmith's trainer opens in W&B."""

    model_config = ConfigDict(extra="forbid")

    project: Name = Field(description="W&B project the run goes into.")
    name: Name | None = Field(None, description="The run's name; default the job id.")
    entity: Name | None = Field(None, description="W&B team or user; default the server's W&B default entity.")
    tags: Tags | None = Field(
        None, description="Tags on the run, besides tunesmith/finetune, tunesmith/<base model> and tunesmith/<job id>.")


class MlflowIntegration(BaseModel):
    """tunesmith's MLflow integration, in the same pattern."""

    model_config = ConfigDict(extra="forbid")

    project: Name = Field(description="MLflow experiment the run goes into.")
    name: Name | None = Field(None, description="The run's name; default the job id.")
    tags: Tags | None = None
    tracking_uri: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="MLflow tracking URI; default the server's (MLFLOW_TRACKING_URI).")


class TrackioIntegration(BaseModel):
    """tunesmith's trackio integration: the server's local trackio store (TRACKIO_DIR)."""

    model_config = ConfigDict(extra="forbid")

    project: Name = Field(description="trackio project the run goes into.")
    name: Name | None = Field(None, description="The run's name; default the job id.")


class TensorboardIntegration(BaseModel):
    """tunesmith's TensorBoard integration: event files in the job's run directory, nothing to set."""

    model_config = ConfigDict(extra="forbid")


class Integration(BaseModel):
    """One entry of `integrations`: the type and, under the key of that name, its settings."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb", "mlflow", "tensorboard", "trackio"]
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None
    tensorboard: TensorboardIntegration | None = None
    trackio: TrackioIntegration | None = None


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Text = Field(description="Base model: registry name (smollm2-135m-instruct) or a model directory on the server.")
    training_file: Text = Field(description="Id of an uploaded file with purpose fine-tune.")
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI in favour of method; still accepted.")
    method: Method | None = None
    suffix: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")] | None = Field(
        None, description="Up to 64 letters, digits, '-', '_' or '.', put into fine_tuned_model."
    )
    validation_file: Text | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 string pairs, kept with the job."
    )
    integrations: list[Integration] | None = Field(
        None, max_length=4, description="Trackers the job reports to: wandb in OpenAI's shape; mlflow, tensorboard "
                                        "and trackio in the same pattern (each needs its extra on the server).")


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "expires_at": None,
        "status_details": row["status_details"],
    }


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = row["method"]
    kind = method["type"]
    given = method.get(kind, {}).get("hyperparameters", {})  # also holds the worker's steps_per_epoch
    hp = {k: v for k, v in given.items() if k in HYPERPARAMETER_KEYS and v is not None}
    method_hp = {**hp, **({"beta": given.get("beta", "auto")} if kind == "dpo" else {})}
    if kind == "reinforcement":
        method_hp.update({k: v for k, v in given.items() if k in ReinforcementHyperparameters.model_fields})
    method_body: dict[str, Any] = {"hyperparameters": method_hp}
    if kind == "reinforcement":
        method_body = {"grader": method[kind]["grader"], **method_body}
    return {
        "id": row["id"],
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": hp,
        "model": row["model"],
        "object": "fine_tuning.job",
        "organization_id": "org-tunesmith",
        "result_files": row["result_files"] or [],
        "seed": row["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"],
        "integrations": row.get("integrations") or [],
        "metadata": row["metadata"],
        "method": {"type": kind, kind: method_body},
        "user_provided_suffix": row["suffix"],
        "lineage": row["lineage"],
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "object": "fine_tuning.job.event",
        "data": row["data"] or {},
        "type": row["type"],
    }


def checkpoint_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": row["fine_tuned_model_checkpoint"],
        "fine_tuning_job_id": row["job_id"],
        "metrics": row["metrics"],
        "object": "fine_tuning.job.checkpoint",
        "step_number": row["step"],
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
