"""The demo's calibration curve: held-out accuracy after N training steps of its recipe.

    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/demo_calibration.py --steps 30,60,90,150,290

For each N it trains the demo's LoRA recipe (flows.demo.DEMO_TRAIN with max_steps=N, so the
one-cycle schedule fits N) on data/banking77/train.csv and measures the adapter on the
demo's 308 held-out rows, exactly as `tunesmith demo` does; it prints one line per N and the
CALIBRATION tuple flows/demo.py keeps. docs/evaluation.md has the table. Each point costs a
full training run (290 steps: ~8 min with bf16 hardware), so run it on a quiet machine.
--learning-rate, --batch-size and --lora-layers try other recipes for slow machines. The
answers are held to the labels, as the demo holds them (flows.demo.label_answers).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="30,60,90,150,290")
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lora-layers", type=int, default=None, help="LoRA on the last N decoder layers only.")
    args = ap.parse_args()

    from tunesmith.data.example import split_example
    from tunesmith.evaluate.evaluation import load_examples
    from tunesmith.flows import demo
    from tunesmith.flows.heldout import evaluate_side
    from tunesmith.models.hardware import detect_machine
    from tunesmith.models.registry import DEFAULT_MODEL, pull_model

    pull_model(DEFAULT_MODEL, log=lambda _m: None)
    data = demo.find_demo_data()
    machine = detect_machine()
    print(f"machine: {machine.describe()}")
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        heldout, n_rows, _ = demo.write_heldout(data / "test.csv", out)
        held = load_examples(heldout, output_column="category", system=demo.SYSTEM)
        labels = sorted({split_example(ex)[1] for ex in load_examples(data / "train.csv", output_column="category")})
        answers, max_new_tokens = demo.label_answers(DEFAULT_MODEL, labels)
        for n in [int(s) for s in args.steps.split(",")]:
            settings = {**demo.DEMO_TRAIN, "max_steps": n, "epochs": 10}
            if args.learning_rate:
                settings["learning_rate"] = args.learning_rate
            if args.batch_size:
                settings["batch_size"] = args.batch_size
            if args.lora_layers:
                settings["lora_layers"] = args.lora_layers
            t0 = time.perf_counter()
            run_dir = demo._train(DEFAULT_MODEL, data / "train.csv", out / f"run-{n}", settings, lambda _m: None)
            train_s = time.perf_counter() - t0
            res = evaluate_side(DEFAULT_MODEL, run_dir, held, heldout, None, demo.SYSTEM, "label", labels,
                                max_new_tokens, with_loss=False, log=lambda _m: None, constraint=answers)
            acc = res.metrics["scores"]["accuracy"]
            points.append((n, round(acc, 3)))
            print(f"{n:4d} steps (batch {settings['batch_size']}, lr {settings['learning_rate']:g}, "
                  f"lora layers {settings.get('lora_layers') or 'all'}): "
                  f"{100 * acc:.1f}% on {n_rows} held-out rows, {train_s:.0f} s training", flush=True)
    print(f"CALIBRATION = {tuple(points)}")


if __name__ == "__main__":
    main()
