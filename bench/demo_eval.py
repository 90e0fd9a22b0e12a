"""What the demo's evaluation costs, as it was and as it is now, interleaved on the same rows.

    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/demo_eval.py --rows 64 --rounds 2

Variants, each on the base model and on base + a LoRA adapter (r=16, all linear layers,
random weights: an untrained adapter costs what a trained one does):
  free    as the demo evaluated before: free text, at most 16 new tokens, and on the adapter
          side the reference loss of every row on top
  labels  as it does now (flows.demo.label_answers): answers held to the 77 intent labels, at
          most the longest label's tokens + 1, the rest of a label written without forward
          passes once its first tokens single it out; no reference loss
The adapter runs twice: as a LoRA layer (how serve keeps it), and merged into the base's
weights (how eval, compare and the demo load it since load_for_inference(merge=True)).
Prints per variant: decode steps (forward passes after the prefill; they do not depend on how
busy the machine is), completion tokens per row, and seconds (interleaved, so a busy machine
slows every variant alike). With ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 it runs with AVX2-only kernels, in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def random_adapter(model: str, out: Path) -> Path:
    """A LoRA adapter (demo's shape) with random, non-zero weights, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.registry import load_model, resolve_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(resolve_model(model)),
                                LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    peft_model.save_pretrained(out)
    return out


def run(loaded, prompts, examples, variant: str, answers, max_new_tokens: int) -> tuple[int, float, float, list[str]]:
    from tunesmith.evaluate.loss import reference_loss
    from tunesmith.generate.engine import LocalEngine, SamplingParams

    engine = LocalEngine(loaded, max_batch_rows=16)
    params = SamplingParams(16, 0.0) if variant == "free" else SamplingParams(max_new_tokens, 0.0, constraint=answers)
    try:
        t = time.perf_counter()
        gens = engine.generate_batch(prompts, loaded.model_id, params)
        if variant == "free" and loaded.adapter is not None:
            reference_loss(loaded.model, loaded.tokenizer, examples, 16)
        seconds = time.perf_counter() - t
        steps = engine.stats()["steps"]
    finally:
        engine.close()
    return steps, statistics.mean(g.completion_tokens for g in gens), seconds, [g.text.strip() for g in gens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="Held-out rows (spread over the intents).")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from tunesmith.data.example import split_example
    from tunesmith.data.render import render_prompt
    from tunesmith.evaluate.evaluation import load_examples
    from tunesmith.flows import demo
    from tunesmith.models.hardware import detect_machine
    from tunesmith.models.inference import load_for_inference
    from tunesmith.models.registry import DEFAULT_MODEL

    data = demo.find_demo_data()
    machine = detect_machine()
    print(f"machine: {machine.describe()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        heldout, n_rows, _ = demo.write_heldout(data / "test.csv", Path(tmp))
        held = load_examples(heldout, output_column="category", system=demo.SYSTEM)
        held = [held[i * len(held) // args.rows] for i in range(min(args.rows, len(held)))]
        labels = sorted({split_example(ex)[1] for ex in load_examples(data / "train.csv", output_column="category")})
        answers, max_new_tokens = demo.label_answers(DEFAULT_MODEL, labels)
        adapter = random_adapter(DEFAULT_MODEL, Path(tmp) / "adapter")
        sides = {"base": load_for_inference(DEFAULT_MODEL), "adapter": load_for_inference(DEFAULT_MODEL, adapter),
                 "adapter merged": load_for_inference(DEFAULT_MODEL, adapter, merge=True)}
        prompts = [render_prompt(sides["base"].tokenizer, split_example(ex)[0]) for ex in held]
        print(f"{len(held)} held-out rows, prompts {statistics.mean(map(len, prompts)):.0f} tokens on average; "
              f"labels: at most {max_new_tokens} new tokens", flush=True)
        results: dict[tuple[str, str], list] = {}
        for r in range(args.rounds):
            for side, loaded in sides.items():
                for variant in ("free", "labels") if side != "adapter merged" else ("labels",):
                    out = run(loaded, prompts, held, variant, answers, max_new_tokens)
                    results.setdefault((side, variant), []).append(out)
                    print(f"round {r + 1} {side} {variant}: {out[0]} decode steps, {out[1]:.1f} tokens/row, "
                          f"{out[2]:.1f} s", flush=True)
    print("| side | answers | decode steps | completion tokens/row | seconds (median) | answers that are labels |")
    print("|---|---|---:|---:|---:|---:|")
    for (side, variant), outs in results.items():
        valid = sum(t in labels for t in outs[0][3]) / len(held)
        print(f"| {side} | {variant} | {outs[0][0]} | {outs[0][1]:.1f} | {statistics.median(o[2] for o in outs):.1f} "
              f"| {100 * valid:.0f}% |")


if __name__ == "__main__":
    main()
