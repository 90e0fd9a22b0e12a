"""The one config of a training run: every option, its default and its help text.

`tunesmith train --help` is generated from the fields below (grouped by their `group`),
a YAML file passed with `-c` holds the same keys, and flags override the file.

    tunesmith train -c run.yaml --max-steps 60
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunesmith.errors import ConfigError
from tunesmith.models.registry import DEFAULT_MODEL
from tunesmith.runs import RUN_FILE, read_run_json

GROUPS = ("data", "model", "method", "optimisation", "evaluation", "output", "tracking")
Tracker = Literal["wandb", "mlflow", "tensorboard", "trackio"]
"""The trackers --report-to takes (tunesmith.tracking.base.TRACKERS), each an extra: pip install 'tunesmith[wandb]'."""
# qlora trains the same adapter as lora (only the frozen base is stored differently), so the same rate.
DEFAULT_LEARNING_RATE = {"lora": 1e-3, "qlora": 1e-3, "full": 2e-5, "dpo": 1e-4, "reinforcement": 1e-4}
"""dpo: LoRA DPO moves the policy away from the reference only by a little, so it gets a tenth
of LoRA SFT's rate (docs/training.md says why this value). reinforcement: the same tenth, for the
same reason (docs/rft.md)."""
DEFAULT_BETA = 0.1
DEFAULT_GROUP_SIZE = 4
RL_DEFAULTS = {"grader": None, "group_size": DEFAULT_GROUP_SIZE, "kl_coef": 0.0, "clip_epsilon": 0.2,
               "policy_updates": 1, "max_completion_tokens": 64, "temperature": 1.0, "eval_samples": 1,
               "judge_base_url": None}
"""The reinforcement-only settings and their defaults (any other value with another method is an error)."""
RL_BOUNDS = {"group_size": (2, 64), "max_completion_tokens": (1, 4096), "eval_samples": (1, 16),
             "temperature": (0.0, 2.0), "kl_coef": (0.0, 10.0)}
"""The ranges the reinforcement settings take, here and in the jobs API (serve/jobs_protocol.py):
each step samples batch_size x group_size answers of up to max_completion_tokens, so an unbounded
value is hours of sampling or an allocation that cannot succeed."""
_WHY_BOUND = {"group_size": "each step samples batch_size x group_size answers",
              "max_completion_tokens": "each answer is sampled a token at a time, and kept in memory to train on",
              "eval_samples": "each held-out prompt is answered this many times",
              "temperature": "as OpenAI's sampling", "kl_coef": "the penalty would outweigh the reward"}


def _field(default: Any, group: str, help: str) -> Any:
    return Field(default, description=help, json_schema_extra={"group": group})


class TrainConfig(BaseModel):
    """A training run. Unknown keys are an error; instances are never mutated."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # data
    data: Path = _field(..., "data", "Training data file (.jsonl in chat, prompt/completion or alpaca format, or .csv/.tsv; "
                         "for --method dpo, .jsonl preference pairs).")
    validation: Path | None = _field(None, "data", "Validation data file; without it --val-split holds out a share of --data.")
    val_split: float = _field(0.0, "data", "Share of --data held out for validation when --validation is not given (0 = none).")
    format: str | None = _field(None, "data", "Data format; detected from the file when not given.")
    input_column: str = _field("text", "data", "CSV/TSV column holding the user message.")
    output_column: str | None = _field(None, "data", "CSV/TSV column holding the assistant answer to learn (required for CSV/TSV).")
    system: str | None = _field(None, "data", "System prompt put before every CSV/TSV row.")
    max_seq_len: int = _field(2048, "data", "Longest example in tokens; longer ones keep their first tokens, and ones left with no answer token are dropped.")
    packing: bool = _field(True, "data", "Pack examples into one padding-free sequence per micro-batch (attention never crosses examples).")
    # model
    model: str = _field(DEFAULT_MODEL, "model", "Base model: registry name, Hugging Face directory or .gguf file.")
    # method
    method: Literal["lora", "full", "qlora", "dpo", "reinforcement"] = _field(
        "lora", "method", "lora (adapter), qlora (adapter on a 4-bit NF4 base: needs a CUDA GPU and "
        "pip install 'tunesmith[gpu]'), full (all weights), dpo (a LoRA adapter trained on preference pairs "
        "with DPO), reinforcement (a LoRA adapter trained with GRPO against --grader on prompt rows; docs/rft.md).")
    lora_rank: int = _field(16, "method", "LoRA rank r.")
    lora_alpha: float = _field(32.0, "method", "LoRA alpha (the update is scaled by alpha / rank).")
    lora_dropout: float = _field(0.0, "method", "Dropout on the LoRA input (costs a random mask per layer per step).")
    lora_target_modules: list[str] | Literal["all-linear"] = _field(
        "all-linear", "method", "Modules that get LoRA adapters: all-linear, or comma-separated names (q_proj,v_proj)."
    )
    lora_layers: int | None = _field(
        None, "method", "LoRA on only the last N decoder layers (default all): backward stops below them, so a step "
        "computes fewer FLOPs; the layers below run forward only.", )
    beta: float = _field(DEFAULT_BETA, "method", "DPO: how strongly the policy is held to the reference (the reward "
                         "is beta times the log-probability gained over the reference); higher stays closer.")
    init_adapter: Path | None = _field(None, "method", "lora, dpo and reinforcement: start from this LoRA adapter "
                                       "(a run directory or an adapter directory, e.g. an earlier SFT run) and continue "
                                       "training it; with dpo, and with reinforcement's --kl-coef, it is also the "
                                       "reference.")
    grader: Path | None = _field(None, "method", "reinforcement: the grader that scores each sampled answer (a JSON "
                                 "file with one grader in OpenAI's shape; docs/rft.md).")
    group_size: int = _field(DEFAULT_GROUP_SIZE, "method", "reinforcement: answers sampled per prompt; each answer's "
                             "advantage is its reward against the mean of its group.")
    kl_coef: float = _field(0.0, "method", "reinforcement: weight of the KL penalty to the reference, the policy as "
                            "training started: the --init-adapter (frozen) when given, else the base model (the "
                            "adapter disabled); 0 skips the reference forward pass (KL is then not measured).")
    clip_epsilon: float = _field(0.2, "method", "reinforcement: the probability ratio is clipped to 1 +- this when "
                                 "--policy-updates is above 1 (with 1 the ratio is always 1).")
    policy_updates: int = _field(1, "method", "reinforcement: optimizer steps on each batch of sampled answers "
                                 "(GRPO's mu); above 1, later updates are off-policy and the ratio is clipped.")
    max_completion_tokens: int = _field(64, "method", "reinforcement: longest sampled answer in tokens.")
    temperature: float = _field(1.0, "method", "reinforcement: sampling temperature of the answers.")
    eval_samples: int = _field(1, "method", "reinforcement: answers sampled per held-out prompt for the held-out "
                               "reward (every --eval-every-steps and at the end).")
    judge_base_url: str | None = _field(None, "method", "reinforcement: OpenAI-compatible endpoint that score_model "
                                        "and label_model graders ask (default $OPENAI_BASE_URL; key $OPENAI_API_KEY).")
    # optimisation
    epochs: int | Literal["auto"] = _field("auto", "optimisation", "Passes over the data; auto picks from the data size as hosted APIs do.")
    max_steps: int | None = _field(None, "optimisation", "Stop after this many optimizer steps (overrides --epochs).")
    batch_size: int = _field(16, "optimisation", "Examples per optimizer step (over all processes).")
    micro_batch_size: int | None = _field(None, "optimisation", "Examples per forward pass on each process; smaller accumulates gradients (same result, less memory).")
    learning_rate: float | None = _field(None, "optimisation", "Peak learning rate; default 1e-3 for lora and qlora, 1e-4 for dpo, 2e-5 for full.")
    warmup_ratio: float = _field(0.03, "optimisation", "Share of steps with linear warm-up before the cosine decay.")
    weight_decay: float = _field(0.0, "optimisation", "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "optimisation", "Clip the gradient norm to this (0 = no clipping).")
    seed: int = _field(42, "optimisation", "Seed for initialisation, data order and dropout.")
    distributed_strategy: Literal["ddp", "fsdp"] = _field(
        "ddp", "optimisation", "With several processes: ddp (every process holds the whole model) or fsdp (weights, "
        "gradients and optimizer state sharded over processes, for models that don't fit one GPU).")
    precision: Literal["auto", "bf16", "fp32"] = _field("auto", "optimisation", "auto: bf16 compute where the hardware has it, else fp32; trained weights stay fp32.")
    compile: Literal["auto", "on", "off"] = _field(
        "auto", "optimisation", "torch.compile each decoder layer's attention, MLP and norms: the first step then "
        "takes about a minute longer and later ones run ~1.5x faster on a CPU. auto: on when the run trains at "
        "least 100,000 tokens, a C++ compiler (CPU) or triton (GPU) is there, and weights are not FSDP-sharded.")
    # evaluation
    eval_every_steps: int | None = _field(None, "evaluation", "Validation loss and token accuracy every N steps (and always at the end).")
    early_stopping_patience: int | None = _field(None, "evaluation", "Stop after this many evaluations without a better validation loss.")
    # output
    out: Path | None = _field(None, "output", "Run directory; default runs/<data name>-<time>.")
    save_every_steps: int | None = _field(None, "output", "Checkpoint every N steps (and always at the end, and on Ctrl-C).")
    resume: Path | None = _field(None, "output", "Continue the run in this run directory from its last checkpoint.")
    # tracking
    report_to: list[Tracker] = _field([], "tracking", "Trackers that get the config, every metrics row, the final "
                                      "metrics and the adapter, comma-separated: wandb, mlflow, tensorboard, trackio "
                                      "(each an extra: pip install 'tunesmith[wandb]').")
    tracking_project: str = _field("tunesmith", "tracking", "W&B project, MLflow experiment and trackio project of the run.")
    run_name: str | None = _field(None, "tracking", "The run's name in the trackers; default the run directory's name.")
    tracking_tags: list[str] = _field([], "tracking", "Tags on the run in W&B and MLflow, comma-separated.")
    wandb_entity: str | None = _field(None, "tracking", "W&B team or user; default your W&B default entity.")
    mlflow_tracking_uri: str | None = _field(None, "tracking", "MLflow tracking URI (sqlite:///mlflow.db, http://host:5000); "
                                             "default MLflow's own (MLFLOW_TRACKING_URI).")
    tensorboard_dir: Path | None = _field(None, "tracking", "TensorBoard log directory; default RUN/tensorboard.")

    @field_validator("val_split")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be at least 0 and below 1, e.g. 0.1")
        return v

    @field_validator("max_seq_len", "lora_rank", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("epochs", "max_steps", "micro_batch_size", "eval_every_steps", "save_every_steps", "early_stopping_patience")
    @classmethod
    def _positive_or_none(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float, info: ValidationInfo) -> float:
        if v <= 0:
            raise ValueError("must be positive, e.g. 0.1")
        if v != DEFAULT_BETA and info.data.get("method") != "dpo":
            raise ValueError("applies to --method dpo only")
        return v

    @field_validator(*RL_DEFAULTS)
    @classmethod
    def _reinforcement_only(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name in ("group_size", "policy_updates", "max_completion_tokens", "eval_samples") and v < 1:
            raise ValueError("must be a positive integer")
        if info.field_name == "group_size" and v < 2:
            raise ValueError("must be at least 2 (an advantage compares answers to the same prompt)")
        if info.field_name in ("kl_coef", "clip_epsilon", "temperature") and not 0 <= v < float("inf"):  # NaN too
            raise ValueError("must be a finite number, 0 or more")
        _low, high = RL_BOUNDS.get(info.field_name, (None, None))
        if high is not None and v > high:
            raise ValueError(f"must be at most {high:g}, the jobs API's limit too ({_WHY_BOUND[info.field_name]})")
        if v != RL_DEFAULTS[info.field_name] and info.data.get("method") != "reinforcement":
            raise ValueError("applies to --method reinforcement only")
        return v

    @model_validator(mode="after")
    def _grader_given(self) -> "TrainConfig":
        if self.method == "reinforcement" and self.grader is None:
            raise ValueError("--method reinforcement needs --grader g.json (the grader that scores the answers)")
        return self

    @field_validator("init_adapter")
    @classmethod
    def _lora_adapters_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("method") not in ("lora", "dpo", "reinforcement"):
            raise ValueError("applies to --method lora, dpo and reinforcement only (it continues a LoRA adapter; to train further "
                             "on a full fine-tuning run give that run's model as --model)")
        return v

    @field_validator("lora_layers")
    @classmethod
    def _positive_layers(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1 (the last N decoder layers get LoRA), got {v}")
        return v

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("report_to", "tracking_tags", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @property
    def lr(self) -> float:
        """The learning rate in force: the one given, else the method's default."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE.get(self.method, 1e-4)

    def non_defaults(self) -> dict[str, Any]:
        """Settings that differ from the defaults, for the start-of-run log."""
        out = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if info.is_required() or value != info.default:
                out[name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def field_groups() -> dict[str, list[str]]:
    """Field names by help group, in declaration order."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, info in TrainConfig.model_fields.items():
        groups[(info.json_schema_extra or {})["group"]].append(name)
    return groups


def build_config(values: dict[str, Any], source: str = "options") -> TrainConfig:
    """Validate a dict of settings; every problem is reported at once, with close matches."""
    known = list(TrainConfig.model_fields)
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1)
            key = str(err["loc"][0]) if err["loc"] else ""
            if not err["loc"]:  # a check across fields: its message says it all
                problems.append(err["msg"].removeprefix("Value error, "))
            elif err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
                problems.append(f"unknown key '{key}'{hint}")
            elif err["type"] == "missing":
                problems.append(f"'{key}' is required (--{key.replace('_', '-')})")
            else:
                got = values.get(key, err.get("input"))
                got = str(got) if isinstance(got, Path) else got  # a path as typed, not PosixPath('...')
                msg = err["msg"].removeprefix("Value error, ").removeprefix("value error, ")
                problems.append(f"'{loc or key}' {msg[:1].lower()}{msg[1:]} (got {got!r})")
        raise ConfigError(f"invalid training config in {source}: " + "; ".join(problems)) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """The settings in a YAML file (a mapping of TrainConfig keys)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(config_file: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge: a resumed run's saved config, then the YAML file, then the flags given.

    With `resume`, the run directory's run.json supplies everything not given again, so
    `tunesmith train --resume runs/NAME` alone continues the same run.
    """
    values: dict[str, Any] = {}
    resume = overrides.get("resume")
    file_values = load_yaml(Path(config_file)) if config_file else {}
    resume = resume or file_values.get("resume")
    source = str(config_file) if config_file else "options"
    if resume:
        if not (Path(resume) / RUN_FILE).is_file():
            raise ConfigError(f"--resume '{resume}' is not a run directory (no {RUN_FILE} in it)")
        values.update(read_run_json(resume)["config"])
        values["out"] = str(resume)
    values.update(file_values)
    values.update(overrides)
    if resume:
        values["resume"] = str(resume)
        values["out"] = str(resume)
    return build_config(values, source)
