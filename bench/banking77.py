"""BANKING77 against Casanueva et al. 2020 (Efficient Intent Detection with Dual Sentence
Encoders, Table 3): 85.19% accuracy with 10 training examples per intent (USE+ConveRT),
93.66% with the full training set (fine-tuned BERT-large), on the full 3,080-row test set.

Trains a LoRA adapter on SmolLM2-135M-Instruct for each setting with tunesmith's own
`train()` and evaluates it with `evaluate()` (greedy generation, label accuracy).

    python bench/banking77.py --setting 10 --out bench-runs/banking77
    python bench/banking77.py --setting full --epochs 1 --out bench-runs/banking77
    python bench/banking77.py --setting 10 --test-limit 770   # a quicker partial test set

The full data set is not bundled (the repo carries a 40-per-intent subset); by default it
is read from ../shared/data/banking77 beside the clone.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

PAPER = {"10": ("USE+ConveRT, 10 per intent", 0.8519), "full": ("BERT-large, full data", 0.9366)}
SYSTEM = "Classify the banking customer query into its intent label."
REPO = Path(__file__).resolve().parent.parent


def subset(train_csv: Path, per_intent: int | None, out: Path) -> Path:
    """The first `per_intent` rows of each intent in file order (None: all rows)."""
    if per_intent is None:
        return train_csv
    kept: dict[str, list[list[str]]] = defaultdict(list)
    with open(train_csv, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        for row in reader:
            if len(kept[row[1]]) < per_intent:
                kept[row[1]].append(row)
    path = out / f"train-{per_intent}.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for rows in kept.values():
            w.writerows(rows)
    return path


def limited_test(test_csv: Path, limit: int | None, out: Path) -> Path:
    """The test set, or `limit` rows spread evenly over it (every intent kept)."""
    if not limit:
        return test_csv
    with open(test_csv, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    step = max(1, len(body) // limit)
    path = out / f"test-{limit}.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(body[::step][:limit])
    return path


def run_setting(setting: str, data: Path, out: Path, epochs: int, test_limit: int | None) -> dict:
    from tunesmith.evaluate.evaluation import evaluate
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    out.mkdir(parents=True, exist_ok=True)
    train_csv = subset(data / "train.csv", 10 if setting == "10" else None, out)
    test_csv = limited_test(data / "test.csv", test_limit, out)
    run_dir = out / f"run-{setting}"
    t0 = time.perf_counter()
    result = train(TrainConfig(
        data=train_csv, input_column="text", output_column="category", system=SYSTEM,
        out=run_dir, epochs=epochs, learning_rate=1e-3, lora_rank=16, batch_size=16,
    ))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(
        "smollm2-135m-instruct", test_csv, adapter=result.out_dir, metric="label",
        out=run_dir / "eval", max_new_tokens=16, output_column="category", system=SYSTEM,
    )
    eval_s = time.perf_counter() - t0
    return {
        "setting": setting, "train_file": str(train_csv), "test_file": str(test_csv),
        "test_rows": ev.metrics["n_examples"], "epochs": epochs, "steps": result.steps,
        "accuracy": ev.metrics["scores"]["accuracy"], "macro_f1": ev.metrics["scores"]["macro_f1"],
        "train_s": train_s, "eval_s": eval_s, "paper": PAPER[setting][0], "paper_accuracy": PAPER[setting][1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["10", "full", "both"], default="both")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "banking77")
    ap.add_argument("--out", type=Path, default=Path("bench-runs/banking77"))
    ap.add_argument("--epochs", type=int, default=None, help="Default: 3 for 10 per intent, 1 for full data.")
    ap.add_argument("--test-limit", type=int, default=None, help="Evaluate on this many test rows (default: all 3,080).")
    args = ap.parse_args()
    if not (args.data / "train.csv").is_file():
        raise SystemExit(f"no banking77 train.csv in {args.data}; pass --data DIR")
    settings = ["10", "full"] if args.setting == "both" else [args.setting]
    results = []
    for s in settings:
        epochs = args.epochs or (3 if s == "10" else 1)
        results.append(run_setting(s, args.data, args.out, epochs, args.test_limit))
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'setting':<10}{'tunesmith':>12}{'paper':>10}  paper model               test rows  train s")
    for r in results:
        print(f"{r['setting']:<10}{100 * r['accuracy']:>11.2f}%{100 * r['paper_accuracy']:>9.2f}%  "
              f"{r['paper']:<26}{r['test_rows']:>9}  {r['train_s']:>7.0f}")


if __name__ == "__main__":
    main()
