"""Base model against fine-tuned adapter on the same held-out rows: the one composition of
"did the fine-tune help", used by `tunesmith demo` and by a fine-tuning job's evaluation
stage (and so by the jobs API's evaluation events).

Both sides get the same prompts: each row's own conversation with the system prompt the
run trained with (or the one given), so the comparison measures the adapter, not the prompt.

    python -c "from tunesmith.flows.heldout import base_vs_tuned; \
help(base_vs_tuned)"
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith import __version__
from tunesmith.data.example import Example
from tunesmith.evaluate.comparison import FINE_TUNED, ZERO_SHOT, Comparison, Strategy, verdict
from tunesmith.evaluate.evaluation import (
    EvalResult,
    evaluate_examples,
    load_eval,
    load_examples,
    run_info,
    run_system_prompt,
    write_eval,
)
from tunesmith.generate.constraints import Constraint
from tunesmith.runs import EVAL_METRICS_FILE, PREDICTIONS_FILE


@dataclass
class HeldoutResult:
    base: EvalResult
    tuned: EvalResult
    system: str | None

    def comparison(self, info: dict[str, Any]) -> Comparison:
        """Both sides as a compare.json (zero-shot base vs fine-tuned), for the report."""
        strategies = [Strategy(f"{ZERO_SHOT} base", self.base, 0.0), Strategy(FINE_TUNED, self.tuned, 0.0)]
        return Comparison(strategies, info, verdict(strategies))

    def summary(self) -> dict[str, Any]:
        """The headline of both sides (a job's evaluation.json)."""
        tuned, base = self.tuned.metrics, self.base.metrics
        return {
            "metric": tuned["metric"],
            "main_metric": tuned["main_metric"],
            "n_examples": tuned["n_examples"],
            "base": {"scores": base["scores"], "loss": base["loss"]},
            "tuned": {"scores": tuned["scores"], "loss": tuned["loss"]},
        }


def base_vs_tuned(
    model: str | Path | None,
    adapter: str | Path,
    data: str | Path,
    base_out: Path | None,
    tuned_out: Path | None,
    system: str | None = None,
    metric: str = "auto",
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    output_column: str | None = None,
    log: Callable[[str], None] = print,
    examples: Sequence[Example] | None = None,
    base_cache: Path | None = None,
) -> HeldoutResult:
    """Evaluate the base model, then base + adapter, on `data` with the same prompts; write
    each side's predictions and metrics to its folder.

    `examples` are `data`'s rows when the caller has read them already (with its columns).
    With `base_cache`, the base side is kept there under a key of everything that decides it
    (the base's weights, the rows, the prompt, the metric and the answer budget) and reused:
    every job, and every sweep trial, on the same validation file would evaluate the same base."""
    system = system if system is not None else run_system_prompt(adapter)
    if examples is None:
        examples = load_examples(data, output_column=output_column, system=system)
    key = base_key(model, adapter, examples, system, metric, labels, max_new_tokens) if base_cache else None
    base = cached_base(base_cache / key, base_out, log) if base_cache and key else None
    if base is None:
        base = evaluate_side(model, None, examples, data, base_out, system, metric, labels, max_new_tokens, True, log)
        if base_cache and key:
            keep_base(base, base_cache / key)
    tuned = evaluate_side(model, adapter, examples, data, tuned_out, system, metric, labels, max_new_tokens, True,
                          log)
    return HeldoutResult(base, tuned, system)


def base_key(model: str | Path | None, adapter: str | Path, examples: Sequence[Example], system: str | None,
             metric: str, labels: Sequence[str] | None, max_new_tokens: int) -> str | None:
    """What decides the base side's evaluation, hashed. The base is named by the weights the run
    trained on (run.json's sha256); a run without one has no key, so it is neither matched nor kept."""
    base = run_info(adapter).get("base_model") or {}
    weights = base.get("sha256") if isinstance(base, dict) else None
    if not weights:
        return None
    rows = [asdict(ex) for ex in examples]
    what = {"model": str(model), "weights": weights, "rows": rows, "system": system, "metric": metric,
            "labels": list(labels) if labels else None, "max_new_tokens": max_new_tokens, "version": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_base(where: Path, base_out: Path | None, log: Callable[[str], None]) -> EvalResult | None:
    """The base side kept at `where`, copied to `base_out`; None when there is none (or it is unreadable)."""
    if not (where / EVAL_METRICS_FILE).is_file():
        return None
    try:
        base = load_eval(where)
    except (OSError, ValueError):
        return None
    log(f"base model: the same rows, prompt and budget were evaluated before; reusing {where}")
    if base_out is not None:
        base_out.mkdir(parents=True, exist_ok=True)
        for name in (EVAL_METRICS_FILE, PREDICTIONS_FILE):
            if (where / name).is_file():
                shutil.copyfile(where / name, base_out / name)
        base.out = base_out
    return base


def keep_base(base: EvalResult, where: Path) -> None:
    """Write the base side to `where` whole or not at all (a folder renamed into place)."""
    if where.exists():
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=where.parent))
    write_eval(tmp, EvalResult(base.metrics, base.predictions))
    try:
        os.rename(tmp, where)
    except OSError:  # another worker kept the same evaluation first
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_side(
    model: str | Path | None,
    adapter: str | Path | None,
    examples: Sequence[Example],
    data: str | Path,
    out: Path | None,
    system: str | None,
    metric: str = "auto",
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    with_loss: bool = True,
    log: Callable[[str], None] = print,
    batch_size: int = 16,
    constraint: Constraint | None = None,
) -> EvalResult:
    """One side (adapter None: the base model) on the held-out examples, written to `out`.
    The demo calls it for the base before training and for the adapter after."""
    log(f"{'base model' if adapter is None else 'adapter ' + str(adapter)}: evaluating on {len(examples)} "
        f"examples from {data}")
    return evaluate_examples(model, adapter, examples, data, out, system, metric=metric, labels=labels,
                             max_new_tokens=max_new_tokens, with_loss=with_loss, log=log, batch_size=batch_size,
                             constraint=constraint)
