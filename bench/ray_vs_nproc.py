"""The cost of Ray: the same run with `--nproc 2` (torchrun) and with 2 Ray Train workers.

    pip install -e '.[ray]'
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/ray_vs_nproc.py --steps 8

Both train SmolLM2-135M-Instruct (LoRA r=16, all linear layers, bf16 autocast where the CPU
has it) on the first banking77 rows, same seed, batch and schedule; each contender is one
`tunesmith train` command (the Ray one starts a local 2-CPU Ray cluster, `--ray-address local`).
Prints one markdown row per contender: wall time of the whole command, the trainer's own
tokens/s (steady steps), the final training loss, and the largest difference between the
two adapters' weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(name: str, extra: list[str], out: Path, steps: int, model: str) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "train", "--model", model, "--data",
           str(REPO / "data" / "banking77" / "train.csv"), "--input-column", "text", "--output-column", "category",
           "--out", str(out), "--max-steps", str(steps), "--batch-size", "16", "--seed", "7",
           "--save-every-steps", str(steps), "--compile", "off", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    return {"name": name, "wall_s": wall, "tokens_per_s": metrics["tokens_per_s"], "loss": metrics["train_loss"],
            "train_time_s": metrics["train_time_s"], "adapter": out / "adapter"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=1, help="rounds, alternating which contender goes first")
    args = ap.parse_args()
    from safetensors.torch import load_file

    contenders = [("--nproc 2 (torchrun)", ["--nproc", "2"]),
                  ("2 Ray Train workers", ["--ray-address", "local", "--ray-workers", "2"])]
    rows, diffs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # ABBA...: a load that drifts hits both alike
            pair = {}
            for name, extra in contenders if i % 2 == 0 else contenders[::-1]:
                pair[name] = run(name, extra, Path(tmp) / f"{i}-{len(pair)}", args.steps, args.model)
                rows.append(pair[name])
            a, b = (load_file(str(r["adapter"] / "adapter_model.safetensors")) for r in pair.values())
            diffs.append(max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| contender | command wall (s) | training (s) | tokens/s (steady) | final train loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['train_time_s']:.1f} | {r['tokens_per_s']:.0f} | {r['loss']:.4f} |")
    speed = {name: sum(r["tokens_per_s"] for r in rows if r["name"] == name) for name, _ in contenders}
    losses = {r["loss"] for r in rows}
    print(f"\nRay / torchrun tokens/s (summed over rounds): {speed[contenders[1][0]] / speed[contenders[0][0]]:.3f}; "
          f"final losses {sorted(losses)}; largest adapter weight difference {max(diffs):.2e}")


if __name__ == "__main__":
    main()
