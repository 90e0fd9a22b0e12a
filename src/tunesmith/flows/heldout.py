"""Base model against fine-tuned adapter on the same held-out rows: the one composition of
"did the fine-tune help", used by `tunesmith demo` and by a fine-tuning job's evaluation
stage (and so by the jobs API's evaluation events).

Both sides get the same prompts: each row's own conversation with the system prompt the
run trained with (or the one given), so the comparison measures the adapter, not the prompt.

    python -c "from tunesmith.flows.heldout import base_vs_tuned; \
help(base_vs_tuned)"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith.data.example import Example
from tunesmith.evaluate.comparison import FINE_TUNED, ZERO_SHOT, Comparison, Strategy, verdict
from tunesmith.evaluate.evaluation import EvalResult, evaluate_examples, load_examples, run_system_prompt
from tunesmith.generate.constraints import Constraint


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
) -> HeldoutResult:
    """Evaluate the base model, then base + adapter, on `data` with the same prompts; write
    each side's predictions and metrics to its folder."""
    system = system if system is not None else run_system_prompt(adapter)
    examples = load_examples(data, output_column=output_column, system=system)
    base = evaluate_side(model, None, examples, data, base_out, system, metric, labels, max_new_tokens, True, log)
    tuned = evaluate_side(model, adapter, examples, data, tuned_out, system, metric, labels, max_new_tokens, True,
                          log)
    return HeldoutResult(base, tuned, system)


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
