"""A sweep's YAML: a base training config, a search space, a sampler, a budget, an objective.

    name: lr-and-rank                  # the study; running the same name again continues it
    base: run.yaml                     # a `tunesmith train -c` file (relative to this one), or a mapping
    search_space:
      learning_rate: {type: log-uniform, low: 1.0e-4, high: 3.0e-3}
      lora_rank: {type: choice, values: [4, 8, 16]}
      epochs: {type: int, low: 1, high: 3}
      warmup_ratio: {type: uniform, low: 0.0, high: 0.1}
    sampler: tpe                       # grid (choice parameters only), random, tpe
    trials: 16
    parallelism: 2                     # trials queued at once (as many workers run them)
    objective: valid_loss              # or eval:<metric> (the job's evaluation on the validation file)
    pruner: median                     # or none

    python -c "from tunesmith.jobs.sweep_config import load_sweep_config; print(load_sweep_config('sweep.yaml'))"
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunesmith.errors import ConfigError
from tunesmith.evaluate.metrics import SCORE_NAMES
from tunesmith.train.config import TrainConfig, build_config, load_yaml

NOT_SEARCHED = ("data", "validation", "out", "resume", "model", "report_to", "init_adapter")
"""TrainConfig keys a search space may not vary: the job's files, model and folders are the sweep's."""


class Param(BaseModel):
    """One searched setting: choice (values), uniform, log-uniform (low, high) or int (low, high)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["choice", "uniform", "log-uniform", "int"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> "Param":
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("a choice takes 'values' (a non-empty list) and no low/high")
        else:
            if self.values is not None or self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a {self.type} takes 'low' < 'high' and no values")
            if self.type == "log-uniform" and self.low <= 0:
                raise ValueError("a log-uniform needs low > 0")
            if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
                raise ValueError("an int takes whole numbers for low and high")
        return self


BESIDE_SCORES = ("loss", "perplexity")
"""eval:<name>s read from the evaluation's loss, not from its scores."""
MINIMISED = ("valid_loss", *BESIDE_SCORES, "invalid_label_share")
EVAL_OBJECTIVES = sorted({name for names in SCORE_NAMES.values() for name in names} | set(BESIDE_SCORES))
"""What eval:<score> may name: a score of any metric the job's evaluation reports, or its loss."""


class SweepConfig(BaseModel):
    """A hyperparameter sweep. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The study's name; the same name continues it.")
    base: dict[str, Any] = Field(description="The training config every trial starts from (TrainConfig keys).")
    search_space: dict[str, Param]
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    trials: int = Field(16, ge=1, le=1000)
    parallelism: int = Field(1, ge=1, le=64)
    objective: str = Field("valid_loss", description="valid_loss (minimised) or eval:<score> (the job's "
                                                     "evaluation of the tuned model on the validation file: "
                                                     "accuracy, macro_f1, exact_match, ..., or loss).")
    pruner: Literal["median", "none"] = "median"
    seed: int = 0

    @property
    def direction(self) -> str:
        metric = self.objective.removeprefix("eval:")
        return "minimize" if metric in MINIMISED else "maximize"

    def base_config(self) -> TrainConfig:
        return build_config(self.base, "the sweep's base config")


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and check a sweep file; every problem is reported at once."""
    path = Path(path)
    values = load_yaml(path)
    path = path.resolve()  # data paths become absolute: best.yaml reproduces the run from anywhere
    base = values.get("base")
    if isinstance(base, str):  # a `tunesmith train -c` file, relative to the sweep file
        base_path = path.parent / base
        values["base"] = _with_paths(load_yaml(base_path), base_path.parent)
    elif isinstance(base, dict):
        values["base"] = _with_paths(base, path.parent)
    try:
        cfg = SweepConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), list(SweepConfig.model_fields), n=1)
                problems.append(f"unknown key '{loc}'" + (f"; did you mean '{close[0]}'?" if close else ""))
            else:
                problems.append(f"'{loc}' {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
        raise ConfigError(f"invalid sweep config in {path}: " + "; ".join(problems)) from None
    problems = []
    fields = list(TrainConfig.model_fields)
    for key in cfg.search_space:
        if key in NOT_SEARCHED:
            problems.append(f"search_space.{key}: the sweep sets {key} for every trial; put it in base")
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            problems.append(f"search_space.{key} is not a training setting" + (f"; did you mean '{close[0]}'?" if close else ""))
    if cfg.sampler == "grid" and any(p.type != "choice" for p in cfg.search_space.values()):
        problems.append("sampler grid searches choice parameters only; give each a list of values, or use random or tpe")
    if cfg.objective != "valid_loss" and not cfg.objective.startswith("eval:"):
        problems.append(f"objective '{cfg.objective}': use valid_loss or eval:<score> (e.g. eval:accuracy)")
    elif cfg.objective.startswith("eval:") and cfg.objective.removeprefix("eval:") not in EVAL_OBJECTIVES:
        score = cfg.objective.removeprefix("eval:")
        # label_accuracy -> accuracy: a score named inside the name first, then a spelling near it
        close = (sorted((n for n in EVAL_OBJECTIVES if n in score), key=len, reverse=True)
                 or difflib.get_close_matches(score, EVAL_OBJECTIVES, n=1, cutoff=0.5))
        problems.append(f"objective '{cfg.objective}': the evaluation reports no score '{score}'"
                        + (f"; did you mean 'eval:{close[0]}'?" if close else "")
                        + f" (scores: {', '.join(EVAL_OBJECTIVES)})")
    if cfg.objective.startswith("eval:") and not cfg.base.get("validation"):
        problems.append(f"objective {cfg.objective} scores each trial on base.validation, which is not set")
    if problems:
        raise ConfigError(f"invalid sweep config in {path}: " + "; ".join(problems))
    cfg.base_config()  # the base trains as it is: its own problems, all at once
    return cfg


def _with_paths(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Data paths as the file that names them means them: relative to that file's folder."""
    return {k: str(folder / str(v)) if k in ("data", "validation") and v is not None else v
            for k, v in config.items()}
