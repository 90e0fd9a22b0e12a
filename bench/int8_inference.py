"""Greedy answers with the base in int8 against fp32 on banking77 held-out rows: agreement and
decode speed (issue 24, part 4).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_inference.py --rows 48
    .venv/bin/python bench/int8_inference.py --rows 48 --adapter runs/demo/run   # with an adapter
    OMP_NUM_THREADS=1 .venv/bin/python bench/int8_inference.py --kernels   # the matmul kernels alone

The rows are the demo's held-out rows (the first 4 test rows of every intent,
flows.demo.write_heldout), `--rows` of them taken evenly over the intents, asked with the
demo's system prompt and max_new_tokens.
- Agreement: each weights setting answers every row greedily through the engine, as eval
  does (batches of 16); the share of rows whose answer text is identical to fp32's.
- Decode tokens/s: `--batch-sizes` rows (their prompts cut to one length) are prefilled
  once per model, then the models take decode steps in turn, one step each, so a busy
  machine slows both alike; tokens/s = rows x steps / time in those steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def heldout_prompts(n_rows: int) -> list:
    from tunesmith.data.example import split_example
    from tunesmith.evaluate.evaluation import load_examples
    from tunesmith.flows.demo import SYSTEM, write_heldout

    path, total, _ = write_heldout(REPO / "data" / "banking77" / "test.csv", Path(tempfile.mkdtemp()))
    examples = load_examples(path, output_column="category", system=SYSTEM)
    picked = [examples[i * total // n_rows] for i in range(n_rows)]
    return [split_example(ex)[0] for ex in picked]


def answers(loaded, prompts: list) -> list[str]:
    from tunesmith.evaluate.evaluation import generate_greedy
    # Free text (no label constraint), 16 tokens at most: every token of the answer is compared.
    return [g.text for g in generate_greedy(loaded, prompts, 16, 16)]


def decode_rates(models: dict, prompt_ids: list[list[int]], rows: int, steps: int) -> dict[str, float]:
    """Decode tokens/s of each model on `rows` prompts, steps interleaved between models."""
    import torch

    length = min(len(p) for p in prompt_ids[:rows])
    ids = torch.tensor([p[:length] for p in prompt_ids[:rows]])
    state, spent = {}, {name: 0.0 for name in models}
    with torch.inference_mode():
        for name, m in models.items():
            out = m(input_ids=ids, use_cache=True)
            state[name] = (out.cache, out.logits[:, -1:].argmax(-1))
        for _ in range(steps):
            for name, m in models.items():
                cache, last = state[name]
                t = time.perf_counter()
                out = m(input_ids=last, cache=cache, use_cache=True)
                spent[name] += time.perf_counter() - t
                state[name] = (out.cache, out.logits[:, -1:].argmax(-1))
    return {name: rows * steps / spent[name] for name in models}


def kernels(rows_list=(1, 8, 16, 32, 720), out_features: int = 1536, in_features: int = 576) -> None:
    """ms per matmul of each candidate kernel for one weight shape (SmolLM2's gate/up)."""
    import torch
    import torch.nn.functional as F

    from tunesmith.models.int8 import quantize_weight

    def ms(fn, n: int = 20) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.05
    q, scale = quantize_weight(w)
    q_t = q.t().contiguous()
    print(f"[{out_features} x {in_features}], ms per matmul\n| rows | fp32 | int8pack, fp32 x | dequantize + fp32 | "
          "int8pack, bf16 x | _int_mm (W8A8) |\n|---|---|---|---|---|---|")
    for rows in rows_list:
        x = torch.randn(rows, in_features)

        def w8a8():
            x_scale = x.abs().amax(1, keepdim=True) / 127
            x_q = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
            return torch._int_mm(x_q, q_t).float() * x_scale * scale

        cells = [ms(lambda: F.linear(x, w)), ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)),
                 ms(lambda: F.linear(x, q.float()) * scale),
                 ms(lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16()))]
        cells.append(ms(w8a8) if rows > 16 else float("nan"))  # _int_mm wants more than 16 rows
        print(f"| {rows} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


def main() -> None:
    import torch

    from tunesmith.data.render import render_prompt
    from tunesmith.models.inference import load_for_inference
    from tunesmith.models.registry import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", default=None)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--steps", type=int, default=16, help="Decode steps timed per batch size.")
    p.add_argument("--kernels", action="store_true", help="Only time the candidate matmul kernels.")
    args = p.parse_args()
    if args.kernels:
        kernels()
        return
    prompts = heldout_prompts(args.rows)
    print(f"{len(prompts)} held-out rows, {torch.get_num_threads()} torch thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    loaded = {w: load_for_inference(args.model, args.adapter, weights=w) for w in ("fp32", "int8")}
    said = {}
    for w, lm in loaded.items():
        t = time.perf_counter()
        said[w] = answers(lm, prompts)
        print(f"{w}: {len(prompts)} answers in {time.perf_counter() - t:.1f} s", flush=True)
    same = sum(x == y for x, y in zip(said["fp32"], said["int8"]))
    print(f"answers identical: {same}/{len(prompts)} ({100 * same / len(prompts):.1f}%)")
    for x, y in zip(said["fp32"], said["int8"]):
        if x != y:
            print(f"    differs: fp32 {x!r} / int8 {y!r}")
    ids = [render_prompt(loaded["fp32"].tokenizer, p) for p in prompts]
    print("| rows decoded together | fp32 decode tokens/s | int8 decode tokens/s | int8 / fp32 |\n|---|---|---|---|")
    for rows in (int(b) for b in args.batch_sizes.split(",")):
        rates = decode_rates({w: lm.model for w, lm in loaded.items()}, ids, rows, args.steps)
        print(f"| {rows} | {rates['fp32']:.1f} | {rates['int8']:.1f} | {rates['int8'] / rates['fp32']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
