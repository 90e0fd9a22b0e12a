"""Issue 22's effect on training: a tunesmith fine-tune on the clean banking77 copy, on the
copy with planted faults, and on that copy after `tunesmith audit --fix`, each scored on
the same held-out rows.

The planted copy is bench/audit_planted.py's (exact and near duplicates, 100 test rows
copied into training, flipped labels), with a larger share of flipped labels by default
(20% instead of 5%): at 5% the cost of the noise is about the size of the test set's own
sampling error (about 1.4 points on 670 rows at 85%), so its recovery could not be told
from noise. The held-out rows are the bundled test rows that were not copied into training,
so leakage lifts no copy's score. Every run uses the demo's recipe (LoRA r=16, lr 1e-3,
batch 16) for the same number of steps; answers are held to the 77 labels (`--choices`).

    python bench/audit_training_effect.py --out bench-runs/audit-effect            # ~1 h on 1 core
    python bench/audit_training_effect.py --out bench-runs/audit-effect --steps 60  # a quick look

Every step is a `tunesmith` command, printed before it runs; a step whose result is already
in OUT is skipped, so the script can be stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_planted import plant, read, write  # noqa: E402 (the bench folder is not a package)
from banking77_sweep import run  # noqa: E402

SYSTEM = "Classify the banking customer query into its intent label."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-runs/audit-effect"))
    ap.add_argument("--flip-share", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=290, help="Training steps of every run (the demo's 290).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tunesmith = str(Path(sys.executable).parent / "tunesmith")

    train, test = read("train.csv"), read("test.csv")
    rows, planted, flipped = plant(train, test, args.seed, args.flip_share)
    leaked = {test.index(rows[line - 2]) for line in planted["leakage"]}
    paths = {"clean": write(out / "clean.csv", train), "planted": write(out / "planted.csv", rows)}
    test_path = write(out / "test.csv", test)
    heldout = write(out / "heldout.csv", [r for i, r in enumerate(test) if i not in leaked])
    labels = sorted({c for _, c in train})

    paths["fixed"] = out / "fixed.csv"
    if not paths["fixed"].is_file():
        run([tunesmith, "audit", paths["planted"], "--test", test_path, "--input-column", "text",
             "--output-column", "category", "--fix", paths["fixed"], "--fix-labels", "drop",
             "--json"], out / "audit.log", ok=(0, 1))  # 1: the audit found problems, as planted

    scores, train_s = {}, {}
    for name, data in paths.items():
        run_dir = out / f"run-{name}"
        if not (run_dir / "adapter").is_dir():
            t0 = time.perf_counter()
            run([tunesmith, "train", "--data", data, "--input-column", "text", "--output-column", "category",
                 "--system", SYSTEM, "--max-steps", args.steps, "--learning-rate", "1e-3", "--lora-rank", "16",
                 "--batch-size", "16", "--seed", args.seed, "--out", run_dir], out / f"train-{name}.log")
            train_s[name] = round(time.perf_counter() - t0)
        ev = out / f"eval-{name}"
        if not (ev / "metrics.json").is_file():
            run([tunesmith, "eval", "--adapter", run_dir, "--data", heldout, "--input-column", "text",
                 "--output-column", "category", "--system", SYSTEM, "--metric", "label", "--max-new-tokens", "16",
                 "--choices", ",".join(labels), "--no-trackers", "--out", ev], out / f"eval-{name}.log")
        scores[name] = json.loads((ev / "metrics.json").read_text())["scores"]["accuracy"]

    fixed_rows = sum(1 for _ in open(paths["fixed"], encoding="utf-8")) - 1
    lost = scores["clean"] - scores["planted"]
    summary = {
        "rows": {"clean": len(train), "planted": len(rows), "fixed": fixed_rows},
        "planted": {"flipped_labels": len(flipped), **{k: len(v) for k, v in planted.items()}},
        "heldout_rows": len(test) - len(leaked), "steps": args.steps, "accuracy": scores,
        "recovered_share": (scores["fixed"] - scores["planted"]) / lost if lost > 0 else None,
        "train_s": train_s,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
