"""One forward of the demo's shapes on the base, on base + an unmerged LoRA adapter (r=16,
all linear layers, as serve holds it) and on the adapter merged into the base (as eval loads
it since load_for_inference(merge=True)): a 16-row prefill of 40 tokens and one 16-row
decode step, interleaved for --rounds rounds; prints the minimum and median of each.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1 \\
        HF_HUB_OFFLINE=1 .venv/bin/python bench/merged_forward.py --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_eval import random_adapter  # noqa: E402 (the bench folder is not a package)


def main() -> None:
    import torch

    from tunesmith.models.inference import load_for_inference
    from tunesmith.models.registry import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    adapter = random_adapter(DEFAULT_MODEL, Path(tempfile.mkdtemp()) / "adapter")
    sides = {"base": load_for_inference(DEFAULT_MODEL), "lora": load_for_inference(DEFAULT_MODEL, adapter),
             "merged": load_for_inference(DEFAULT_MODEL, adapter, merge=True)}
    prefill, step = torch.randint(0, 40000, (16, 40)), torch.randint(0, 40000, (16, 1))
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, loaded in sides.items():
                t = time.perf_counter()
                out = loaded.model(input_ids=prefill, use_cache=True)
                times.setdefault((name, "prefill"), []).append(time.perf_counter() - t)
                t = time.perf_counter()
                loaded.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
                times.setdefault((name, "decode"), []).append(time.perf_counter() - t)
    for (name, phase), ts in times.items():
        print(f"{name:7s} {phase:8s} min {1000 * min(ts):6.0f} ms  median {1000 * statistics.median(ts):6.0f} ms")


if __name__ == "__main__":
    main()
