"""Where reinforcement fine-tuning's sampling spends its CPU time, and how much it is.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/rft_sampling_profile.py --steps 3
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/rft_sampling_profile.py --steps 2 --profile

Sets a run up as `tunesmith train --method reinforcement` does (reinforce/run.py: the model
with its LoRA adapter built by train.model, the engine on it with one batch row per answer,
bf16 where the CPU has it) on banking77 prompts with bench/banking77_rft.py's system prompt,
and samples --steps steps of --batch-size prompts x --group-size answers through the run's own
`_Context.sample` (its seeds: reinforce.run.sample_seed). No training between steps, so every
version of the code samples the same answers from the same adapter (a fresh LoRA: the base).

Figures are CPU time (time.process_time: every thread of the process, the engine's included),
not wall time, so that a busy machine slows them less; `tokens_sha` hashes every sampled
token, equal across two versions of the code when they sample the same answers. Run it with
PYTHONPATH pointing at another checkout's src/ for a before/after in the same conditions.
--profile runs cProfile on CPU time (time.thread_time) in the engine thread, where the
decode loop runs (every step), and in the calling thread (steps 2..), and prints each one's
top functions. The summary line leaves the first step out (it allocates buffers).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import hashlib
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from banking77 import SYSTEM  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77" / "train.csv"
MODEL = "smollm2-135m-instruct"


def write_prompts(path: Path, n: int) -> None:
    """n banking77 rows spread over the intents (every 10th row), as bench/banking77_rft.py asks."""
    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))[::10][:n]
    path.write_text("".join(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": r["text"]}],
                                        "label": r["category"]}) + "\n" for r in rows))


def top(prof: cProfile.Profile, n: int) -> str:
    """The n functions with the most CPU time of their own, each as a share of the thread's
    total, then the n with the most including what they call."""
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values()) or 1e-9
    lines = [f"total {total:.2f} CPU s; own share, own s, with callees s, calls, function"]
    for key, (_cc, calls, own, cum, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        lines.append(f"{100 * own / total:5.1f}% {own:7.2f} {cum:7.2f} {calls:8d}  {pstats.func_std_string(key)}")
    lines.append("--- by time with callees ---")
    for key, (_cc, calls, own, cum, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:n]:
        lines.append(f"{100 * cum / total:5.1f}% {cum:7.2f} {calls:8d}  {pstats.func_std_string(key)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    import torch

    import tunesmith
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.models.inference import LoadedModel
    from tunesmith.models.registry import identity, load_tokenizer, resolve_model
    from tunesmith.reinforce.run import _Context
    from tunesmith.train import data as td
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.inputs import load_training_items
    from tunesmith.train.model import build_model, precision_dtype
    from tunesmith.train.run import StopFlag

    work = Path(tempfile.mkdtemp(prefix="rft-sampling-"))
    data, grader = work / "prompts.jsonl", work / "grader.json"
    write_prompts(data, args.batch_size * args.steps)
    grader.write_text(json.dumps({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                                  "reference": "{{item.label}}", "operation": "eq"}))
    ref = resolve_model(MODEL)
    cfg = TrainConfig(method="reinforcement", model=str(ref.path), data=data, grader=grader, batch_size=args.batch_size,
                      group_size=args.group_size, max_completion_tokens=args.max_tokens, temperature=args.temperature,
                      val_split=0.0, seed=42, out=work / "run")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(ref)
    prompts, _ = load_training_items(tokenizer, cfg.data, cfg)
    compute_dtype = precision_dtype(cfg.precision)
    model = build_model(ref, cfg, compute_dtype)
    precision = "bf16" if compute_dtype == torch.bfloat16 else "fp32"

    engine_prof = cProfile.Profile(timer=time.thread_time)

    def start_engine_profile(*_a) -> None:  # threading runs it first thing in the engine thread
        sys.setprofile(None)
        engine_prof.enable()

    if args.profile:
        threading.setprofile(start_engine_profile)
    engine = LocalEngine(LoadedModel(model, tokenizer, ref.name, "base", identity(ref)), precision=precision,
                         max_batch_rows=args.batch_size * args.group_size)
    threading.setprofile(None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = _Context(cfg, model, engine, None, pad_id, compute_dtype, "cpu", [], StopFlag(), None)

    print(f"tunesmith from {Path(tunesmith.__file__).parent}; torch threads {torch.get_num_threads()}; "
          f"precision {precision}; {args.batch_size} prompts x {args.group_size} answers, <= {args.max_tokens} tokens, "
          f"temperature {args.temperature:g}; load average {os.getloadavg()}", flush=True)
    main_prof = cProfile.Profile(timer=time.thread_time)
    digest = hashlib.sha256()
    rows = []
    for step in range(args.steps):
        _, indices = td.plan_step(len(prompts), cfg.batch_size, cfg.seed, step)
        measured = args.profile and step > 0
        if measured:
            main_prof.enable()
        cpu0, main0 = time.process_time(), time.thread_time()
        samples, wall = ctx.sample([prompts[i] for i in indices], indices, step)
        cpu, main_cpu = time.process_time() - cpu0, time.thread_time() - main0
        if measured:
            main_prof.disable()
        tokens = sum(len(s.completion_ids) for s in samples)
        for s in samples:
            digest.update(json.dumps(s.completion_ids).encode())
        rows.append({"step": step + 1, "cpu_s": round(cpu, 3), "main_thread_cpu_s": round(main_cpu, 3),
                     "wall_s": round(wall, 3), "answers": len(samples), "answer_tokens": tokens,
                     "prompt_tokens": sum(len(s.prompt_ids) for s in samples)})
        print(json.dumps(rows[-1]), flush=True)
    steady = rows[1:] or rows
    cpu = sum(r["cpu_s"] for r in steady)
    tokens = sum(r["answer_tokens"] for r in steady)
    print(json.dumps({"steps_measured": len(steady), "cpu_s_per_step": round(cpu / len(steady), 3),
                      "cpu_ms_per_answer_token": round(1000 * cpu / max(tokens, 1), 2),
                      "mean_answer_tokens": round(tokens / (len(steady) * args.batch_size * args.group_size), 2),
                      "tokens_sha": digest.hexdigest()[:16], "load_average": os.getloadavg()}), flush=True)
    engine.close()  # the engine thread ends: its profile is complete
    if args.profile:
        print("=== engine thread (the decode loop), CPU time, every step ===")
        print(top(engine_prof, args.top))
        print("=== calling thread (the run's sample and generate_batch), CPU time, steps 2.. ===")
        print(top(main_prof, args.top))


if __name__ == "__main__":
    main()
