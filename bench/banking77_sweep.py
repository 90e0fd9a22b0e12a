"""Issue 21's search: a `tunesmith sweep` on BANKING77 at 10 examples per intent, then the
best configuration and the `tunesmith train` defaults on the full 3,080-row test set.

The 10 examples per intent are the first 10 of each intent in the full training file (as
bench/banking77.py takes them). The search never sees the test set: each intent's first 8
rows train, its last 2 are the validation split (154 rows) whose loss the sweep minimises
and prunes on. Both finalists then train on the same 8-per-intent rows, and only their
adapters are evaluated on the test set, with answers held to the 77 labels (`--choices`)
and, for comparison with earlier figures, as free text.

    python bench/banking77_sweep.py --out bench-runs/banking77-sweep            # 16 trials
    python bench/banking77_sweep.py --out bench-runs/banking77-sweep --trials 4 --test-limit 308

Every step is a `tunesmith` command, printed before it runs, so each can be rerun by hand.
Killing the script and starting it again continues the sweep (the optuna study is in the
jobs database under OUT/home) and skips the steps whose results are already there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from banking77 import limited_test, subset  # noqa: E402 (the bench folder is not a package)

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "Classify the banking customer query into its intent label."
PAPER = 0.8519  # Casanueva et al. 2020, Table 3: USE+ConveRT, 10 per intent, 3,080 test rows

SEARCH_SPACE = {
    "learning_rate": {"type": "log-uniform", "low": 3.0e-4, "high": 5.0e-3},
    "lora_rank": {"type": "choice", "values": [8, 16, 32]},
    "epochs": {"type": "int", "low": 2, "high": 5},
    "batch_size": {"type": "choice", "values": [8, 16]},
}


def split_rows(train_csv: Path, out: Path, per_intent: int, valid_per_intent: int) -> tuple[Path, Path, list[str]]:
    """bench/banking77.py's first `per_intent` rows of each intent: all but the last
    `valid_per_intent` of each train, those validate."""
    by_intent: dict[str, list[list[str]]] = defaultdict(list)
    with open(subset(train_csv, per_intent, out), encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        for row in reader:
            by_intent[row[1]].append(row)
    paths = out / "train.csv", out / "valid.csv"
    cut = per_intent - valid_per_intent
    for path, part in zip(paths, (slice(0, cut), slice(cut, per_intent))):
        with open(path, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for rows in by_intent.values():
                w.writerows(rows[part])
    return paths[0], paths[1], sorted(by_intent)


def run(cmd: list, log: Path, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> None:
    """Print the command, run it with its output appended to `log`, stop on an exit code not in `ok`."""
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        proc = subprocess.run([str(c) for c in cmd], env=env or {**os.environ, "HF_HUB_OFFLINE": "1"},
                              stdout=fh, stderr=subprocess.STDOUT)
    print(f"  ({time.perf_counter() - t0:.0f} s, log {log})", flush=True)
    if proc.returncode not in ok:
        raise SystemExit(f"failed with exit code {proc.returncode}; see {log}")


def evaluate(tunesmith: str, adapter: Path, test_csv: Path, labels: list[str], out: Path, env: dict[str, str],
             held: bool) -> dict:
    summary = out / "metrics.json"
    if not summary.is_file():
        cmd = [tunesmith, "eval", "--model", "smollm2-135m-instruct", "--adapter", adapter, "--data", test_csv,
               "--input-column", "text", "--output-column", "category", "--system", SYSTEM, "--metric", "label",
               "--max-new-tokens", "16", "--out", out]
        run(cmd + (["--choices", ",".join(labels)] if held else []), out.parent / f"{out.name}.log", env)
    return json.loads(summary.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "banking77")
    ap.add_argument("--out", type=Path, default=Path("bench-runs/banking77-sweep"))
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--test-limit", type=int, default=None, help="Evaluate on this many test rows (default: all).")
    ap.add_argument("--free-text", action="store_true", help="Also evaluate both adapters with free answers.")
    args = ap.parse_args()
    if not (args.data / "train.csv").is_file():
        raise SystemExit(f"no banking77 train.csv in {args.data}; pass --data DIR")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tunesmith = str(Path(sys.executable).parent / "tunesmith")
    env = {**os.environ, "TUNESMITH_HOME": str(out / "home"), "HF_HUB_OFFLINE": "1"}
    # The model is pulled into the default home; the sweep's own home only holds its jobs.
    models = Path(os.environ.get("TUNESMITH_HOME", Path.home() / ".cache" / "tunesmith")) / "models"
    (out / "home").mkdir(exist_ok=True)
    if models.is_dir() and not (out / "home" / "models").exists():
        (out / "home" / "models").symlink_to(models)

    train_csv, valid_csv, labels = split_rows(args.data / "train.csv", out, 10, 2)
    base = {"model": "smollm2-135m-instruct", "data": str(train_csv), "validation": str(valid_csv),
            "input_column": "text", "output_column": "category", "system": SYSTEM}
    (out / "run.yaml").write_text(yaml.safe_dump({**base, "eval_every_steps": 40}, sort_keys=False))
    (out / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "banking77-10", "base": "run.yaml", "search_space": SEARCH_SPACE, "sampler": "tpe",
        "trials": args.trials, "parallelism": 1, "objective": "valid_loss", "pruner": "median", "seed": 0,
    }, sort_keys=False))
    t0 = time.perf_counter()
    run([tunesmith, "sweep", "-c", out / "sweep.yaml", "--out", out / "sweep"], out / "sweep.log", env)
    sweep_s = time.perf_counter() - t0
    results = json.loads((out / "sweep" / "sweep.json").read_text())

    # The defaults: `tunesmith train` with nothing but the data, on the same rows.
    (out / "default.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    default_run = out / "default"
    if not (default_run / "adapter").is_dir():
        run([tunesmith, "train", "-c", out / "default.yaml", "--out", default_run], out / "default.log", env)
    default_cfg = json.loads((default_run / "run.json").read_text())["config"]

    test_csv = limited_test(args.data / "test.csv", args.test_limit, out)
    finalists = {"best": out / "sweep" / "adapter", "default": default_run / "adapter"}
    scores: dict[str, dict] = {}
    for name, adapter in finalists.items():
        for held in (True, False) if args.free_text else (True,):
            key = f"{name}-{'labels' if held else 'free'}"
            scores[key] = evaluate(tunesmith, adapter, test_csv, labels, out / f"eval-{key}", env, held)["scores"]

    best = results["best"]
    summary = {
        "trials": [{k: t[k] for k in ("number", "state", "value", "params")} for t in results["trials"]],
        "best": {"params": best["params"], "valid_loss": best["value"]},
        "default": {k: default_cfg[k] for k in ("learning_rate", "lora_rank", "epochs", "batch_size")},
        "test_rows": sum(1 for _ in open(test_csv, encoding="utf-8")) - 1,
        "accuracy": {k: v["accuracy"] for k, v in scores.items()}, "paper": PAPER, "sweep_s": sweep_s,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
