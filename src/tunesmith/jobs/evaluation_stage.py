"""A job's evaluation stage: the base model and the tuned adapter on the validation file.

The worker runs it in a child process after training (like training itself), so it can
be cancelled the same way. Both models get the same prompts (the system prompt the run
trained with); the result is `OUT/evaluation.json` plus each side's predictions. With
`--base-cache`, a base already evaluated on the same rows, prompt and budget is reused.

    python -m tunesmith.jobs.evaluation_stage --model smollm2-135m-instruct \
        --adapter runs/first/adapter --data valid.jsonl --out runs/first/job-eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tunesmith.data.example import Example, split_example
from tunesmith.errors import TunesmithError
from tunesmith.fileio import write_atomically
from tunesmith.evaluate.evaluation import load_examples, run_info, run_system_prompt
from tunesmith.flows.heldout import base_vs_tuned
from tunesmith.models.registry import load_tokenizer, resolve_model
from tunesmith.tracking.sinks import log_after_training

SUMMARY_FILE = "evaluation.json"
BASE_EVALUATIONS = "cache/base-evaluations"
"""Where a worker keeps base evaluations to reuse, under its storage root."""


def run_stage(model: str, adapter: Path, data: Path, out: Path, base_cache: Path | None = None) -> dict[str, Any]:
    """Evaluate base and tuned on `data`; write and return the comparison.

    `data` is read as the run read its validation file (its format and CSV columns, from
    run.json). With `base_cache`, a base already evaluated on the same rows is reused."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg = run_info(adapter).get("config") or {}
    system = run_system_prompt(adapter)
    examples = load_examples(data, format=cfg.get("format"), input_column=cfg.get("input_column") or "text",
                             output_column=cfg.get("output_column"), system=system)
    max_new = answer_budget(model, examples)
    log(f"generating up to {max_new} tokens per example (the longest reference answer plus a margin)")
    held = base_vs_tuned(model, adapter, data, base_out=out / "base", tuned_out=out / "tuned", system=system,
                         max_new_tokens=max_new, log=log, examples=examples, base_cache=base_cache)
    summary = held.summary()
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def answer_budget(model: str, examples: Sequence[Example], margin: int = 8, most: int = 256) -> int:
    """Tokens to generate: the longest reference answer in the file plus a margin.

    Generating past the longest answer can only make a prediction wrong, and on CPU the
    budget is most of the evaluation's time (a base model that answers in prose runs to it)."""
    tokenizer = load_tokenizer(resolve_model(model))
    answers = [split_example(ex)[1] for ex in examples]
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=most)
    return max(margin, min(most, longest + margin))


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The evaluation as tracker metrics: eval/tuned_<score>, eval/base_<score>, eval/*_loss."""
    out = {}
    for side in ("tuned", "base"):
        for name, value in summary[side]["scores"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval/{side}_{name}"] = float(value)
        if summary[side].get("loss") is not None:
            out[f"eval/{side}_loss"] = float(summary[side]["loss"])
    return out


def summary_sentence(summary: dict[str, Any]) -> str:
    """"tuned 91.2% vs base 3.4% label accuracy on 300 validation examples"."""
    main = summary["main_metric"]
    tuned, base = summary["tuned"]["scores"].get(main), summary["base"]["scores"].get(main)

    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if main in ("loss", "perplexity") else f"{100 * v:.1f}%"

    sentence = (f"Evaluation: tuned {fmt(tuned)} vs base {fmt(base)} {main.replace('_', ' ')} "
                f"on {summary['n_examples']} validation examples")
    bl, tl = summary["base"].get("loss"), summary["tuned"].get("loss")
    if bl is not None and tl is not None:
        sentence += f" (reference loss {tl:.3f} vs {bl:.3f})"
    return sentence


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="folder where base evaluations are kept and reused (same rows, prompt and budget)")
    args = parser.parse_args(argv)

    try:
        summary = run_stage(args.model, args.adapter, args.data, args.out, base_cache=args.base_cache)
        # The run's trackers (--report-to, a job's integrations) get the evaluation too.
        log_after_training(args.adapter.parent, evaluation_metrics(summary),
                           warn=lambda msg: print(msg, file=sys.stderr, flush=True))
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
