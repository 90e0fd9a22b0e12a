"""BANKING77: a short supervised adapter, then reinforcement fine-tuning (GRPO) against a
string_check grader on the label, both measured on the same held-out test rows.

    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/banking77_rft.py --out bench-runs/banking77-rft
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/banking77_rft.py --sft-per-intent 3 --rft-steps 30 --test-limit 200

1. SFT: the first --sft-per-intent rows of each intent of the bundled train.csv, LoRA r=16,
   lr --sft-lr (1e-3), batch 16, --sft-epochs epochs (bench/banking77.py's recipe, fewer rows).
2. Held-out accuracy of that adapter (greedy, label accuracy) on --test-limit rows of test.csv.
3. RFT from it (`--init-adapter`): prompts are the next --rft-per-intent rows of each intent
   (rows the SFT never saw), with the same system prompt; the grader is string_check `eq` of
   the answer against the row's label; --group-size answers per prompt.
4. The same held-out accuracy for the RFT adapter.
The RFT curves (reward, held-out reward) are RUN/metrics.jsonl; results.json has the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from banking77 import SYSTEM, limited_test, subset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def rft_prompts(train_csv: Path, skip: int, per_intent: int, out: Path) -> Path:
    """Rows skip..skip+per_intent of each intent as RFT prompt rows (the label beside the messages)."""
    seen: dict[str, int] = defaultdict(int)
    rows = []
    with open(train_csv, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            k = seen[r["category"]]
            seen[r["category"]] += 1
            if skip <= k < skip + per_intent:
                rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}],
                             "label": r["category"]})
    path = out / f"rft-prompts-{per_intent}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accuracy(adapter: Path, test_csv: Path, out: Path) -> tuple[float, float]:
    from tunesmith.evaluate.evaluation import evaluate

    t0 = time.perf_counter()
    ev = evaluate(MODEL, test_csv, adapter=adapter, metric="label", out=out, max_new_tokens=16,
                  output_column="category", system=SYSTEM)
    return ev.metrics["scores"]["accuracy"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-runs/banking77-rft"))
    ap.add_argument("--sft-per-intent", type=int, default=3)
    ap.add_argument("--sft-epochs", type=int, default=3)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--rft-per-intent", type=int, default=2)
    ap.add_argument("--rft-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="RFT prompts per step")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--rft-lr", type=float, default=2e-4)
    ap.add_argument("--kl-coef", type=float, default=0.0, help="KL to the SFT adapter (the init adapter, frozen)")
    ap.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature of the RFT answers")
    ap.add_argument("--test-limit", type=int, default=200)
    args = ap.parse_args()

    from tunesmith.models.registry import resolve_model
    from tunesmith.reinforce.run import train_rft
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / "banking77"
    test_csv = limited_test(data / "test.csv", args.test_limit, out)
    results: dict = {"model": MODEL, "test_rows": args.test_limit}

    sft_dir = out / "sft"
    t0 = time.perf_counter()
    if not (sft_dir / "adapter").is_dir():
        train(TrainConfig(data=subset(data / "train.csv", args.sft_per_intent, out), input_column="text",
                          output_column="category", system=SYSTEM, out=sft_dir, epochs=args.sft_epochs,
                          learning_rate=args.sft_lr, batch_size=16), progress=False)
    results["sft"] = {"per_intent": args.sft_per_intent, "epochs": args.sft_epochs, "learning_rate": args.sft_lr,
                      "train_s": time.perf_counter() - t0}
    results["sft"]["accuracy"], results["sft"]["eval_s"] = accuracy(sft_dir, test_csv, sft_dir / "eval")
    print(f"SFT adapter: {100 * results['sft']['accuracy']:.1f}% on {args.test_limit} test rows", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    grader = out / "label.json"
    grader.write_text(json.dumps({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                                  "reference": "{{item.label}}", "operation": "eq"}))
    prompts = rft_prompts(data / "train.csv", args.sft_per_intent, args.rft_per_intent, out)
    rft_dir = out / "rft"
    t0 = time.perf_counter()
    train_rft(TrainConfig(method="reinforcement", model=str(resolve_model(MODEL).path), data=prompts, grader=grader,
                          init_adapter=sft_dir, out=rft_dir, max_steps=args.rft_steps, batch_size=args.batch_size,
                          group_size=args.group_size, max_completion_tokens=16, learning_rate=args.rft_lr,
                          kl_coef=args.kl_coef, temperature=args.temperature,
                          val_split=0.1, eval_every_steps=5, save_every_steps=5), progress=False)
    results["rft"] = {"steps": args.rft_steps, "batch_size": args.batch_size, "group_size": args.group_size,
                      "learning_rate": args.rft_lr, "kl_coef": args.kl_coef, "temperature": args.temperature,
                      "train_s": time.perf_counter() - t0,
                      "curves": str(rft_dir / "metrics.jsonl")}
    results["rft"]["accuracy"], results["rft"]["eval_s"] = accuracy(rft_dir, test_csv, rft_dir / "eval")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"SFT {100 * results['sft']['accuracy']:.1f}% -> RFT {100 * results['rft']['accuracy']:.1f}% "
          f"on {args.test_limit} held-out rows (SFT {results['sft']['train_s']:.0f} s, RFT {results['rft']['train_s']:.0f} s)")


if __name__ == "__main__":
    main()
