"""Where one tunesmith training step spends its time, and A/B speed levers measured interleaved.

    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_step_profile.py --profile
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_step_profile.py --ab rows16,rows64 --rounds 4
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_step_profile.py --compile --ab rows16 --rounds 200  # drift?
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_step_profile.py --precision fp32 --ab rows16,int8 --parity 20

--compile compiles the layers first (as `tunesmith train --compile on`; the warm-up step
compiles). --profile runs torch.profiler over one LoRA step (SmolLM2-135M, r=16 all linear, packed
banking77 rows, the run's own precision) and prints the operators by self CPU time.
--ab alternates the variants step by step in ONE process (so a busy, shared machine slows
every variant alike) and prints trained-sequence tokens/s per variant:
  rowsN      N banking77 rows packed into one forward/backward (the default step is 16)
  threads1   the same 16 rows with one torch thread instead of the default
  peftcast   the same 16 rows with peft's cast of each LoRA input to fp32 switched back on
             (what tunesmith did before; train.model.set_input_casting)
  sdpa       the same 16 rows with torch's SDPA kernel for the packed attention instead of
             the explicit grouped one (train.model.GROUPED_ATTENTION_MAX_LEN = 0)
  noprefix   the same 16 rows with the common prefix (system prompt, template header)
             computed once per example instead of once per step (collate share_prefix=False)
  topN       the same 16 rows on the model built with LoRA on its last N decoder layers only
             (--lora-layers N: backward stops below them; SmolLM2-135M has 30)
  int8       the same 16 rows on a copy of the model whose frozen base linear layers (the LM head
             stays fp32) are int8 (models/int8.py: dequantized in forward and input-gradient)
Every variant counts the tokens of the rows it trains on (what TRL's tokens/s counts too),
so a variant that computes fewer of them shows as faster. --system demo gives every row the
demo's system prompt (as `tunesmith demo` trains); without it the template's default one.
Prints the machine (CPU class, threads) and the precision first.
--parity N trains N AdamW steps (lr 1e-3, 16 rows each, the same rows for both) on the model and on
its int8 copy from the same LoRA initialisation and prints both losses at every step. With topN
variants in --ab it compares LoRA on all layers with them instead (rows shuffled over all intents),
and prints each one's loss and next-token accuracy on 64 test rows' answers after training:
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/train_step_profile.py --system demo --ab top10 --rounds 0 --parity 40
--precision fp32|bf16 overrides the run's automatic choice (bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77" / "train.csv"
TEST = DATA.with_name("test.csv")


def setup(n_rows: int, system: str | None = None, precision: str = "auto", lora_layers: int | None = None,
          data: Path = DATA, model: bool = True):
    import torch

    from tunesmith.data.formats import ColumnMapping
    from tunesmith.models.registry import load_tokenizer, resolve_model
    from tunesmith.train import data as td
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.model import build_model, precision_dtype

    with open(data, newline="") as fh:
        rows = list(csv.DictReader(fh))[:n_rows]
    path = Path(tempfile.mkdtemp()) / "train.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    cfg = TrainConfig(data=path, output_column="category", max_seq_len=128, system=system, precision=precision,
                      lora_layers=lora_layers)
    ref = resolve_model(cfg.model)
    tok = load_tokenizer(ref)
    examples, _ = td.render_and_filter(tok, td.load_examples(path, None, ColumnMapping("text", "category", system)), 128, str(path))
    dtype = precision_dtype(cfg.precision)
    if not model:
        return None, examples, dtype, tok.pad_token_id
    torch.manual_seed(0)
    model = build_model(ref, cfg, dtype)
    return model, examples, dtype, tok.pad_token_id


def step(model, examples, dtype, pad_id, share_prefix: bool = True) -> int:
    from tunesmith.train import data as td
    from tunesmith.train.model import forward_loss

    batch = td.collate(examples, True, pad_id, share_prefix=share_prefix)
    loss, n, _ = forward_loss(model, batch, dtype)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return batch["tokens"]


def profile(model, examples, dtype, pad_id) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step(model, examples[:16], dtype, pad_id)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        tokens = step(model, examples[16:32], dtype, pad_id)
        wall = time.perf_counter() - t
    print(f"one step: {tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tokens/s (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def int8_copy(model):
    """The model with its frozen base linear layers in int8, LoRA weights as they are now."""
    import copy

    from tunesmith.models.int8 import quantize_frozen_linears

    twin = copy.deepcopy(model)
    print(f"int8: {quantize_frozen_linears(twin)} linear layers quantized", flush=True)
    return twin


def ab(model, examples, dtype, pad_id, variants: list[str], rounds: int, twin=None, tops=None) -> None:
    import torch

    from tunesmith.train import model as tm
    from tunesmith.train.model import set_input_casting

    default_threads = torch.get_num_threads()
    grouped_max = tm.GROUPED_ATTENTION_MAX_LEN
    rates: dict[str, list[float]] = {v: [] for v in variants}
    offset = 0
    step(model, examples[:16], dtype, pad_id)  # warm-up
    for r in range(rounds):
        for v in variants:
            n = int(v[4:]) if v.startswith("rows") else 16
            torch.set_num_threads(1 if v == "threads1" else default_threads)
            set_input_casting(model, v == "peftcast")
            tm.GROUPED_ATTENTION_MAX_LEN = 0 if v == "sdpa" else grouped_max
            chunk = [examples[(offset + i) % len(examples)] for i in range(n)]
            offset += n
            t = time.perf_counter()
            m = twin if v == "int8" else (tops or {}).get(v, model)
            tokens = step(m, chunk, dtype, pad_id, share_prefix=v != "noprefix")
            rates[v].append(tokens / (time.perf_counter() - t))
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.0f}" for v in variants), flush=True)
    torch.set_num_threads(default_threads)
    set_input_casting(model, False)
    tm.GROUPED_ATTENTION_MAX_LEN = grouped_max
    print("| variant | median tokens/s | rounds |\n|---|---|---|")
    for v in variants:
        print(f"| {v} | {statistics.median(rates[v]):.0f} | {len(rates[v])} |")


def parity(models: dict, examples, dtype, pad_id, steps: int, heldout=None) -> None:
    """Train each model `steps` AdamW steps on the same rows; print the losses side by side
    (and, given `heldout` rows, each model's loss on them after training)."""
    import torch

    from tunesmith.train import data as td
    from tunesmith.train.model import forward_loss

    losses: dict[str, list[float]] = {}
    rates: dict[str, float] = {}
    for name, m in models.items():
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name], tokens, t = [], 0, time.perf_counter()
        for s in range(steps):
            batch = td.collate(examples[16 * s:16 * (s + 1)], True, pad_id, share_prefix=True)
            loss, n, _ = forward_loss(m, batch, dtype)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item() / n)
            tokens += batch["tokens"]
        rates[name] = tokens / (time.perf_counter() - t)
        print(f"{name}: {steps} steps at {rates[name]:.0f} tokens/s (one after the other, not interleaved)", flush=True)
    names = list(models)
    print("| step | " + " | ".join(f"{n} loss" for n in names) + " | difference |\n|---|" + "---|" * (len(names) + 1))
    for s in range(steps):
        row = [losses[n][s] for n in names]
        print(f"| {s + 1} | " + " | ".join(f"{x:.4f}" for x in row) + f" | {row[-1] - row[0]:+.4f} |")
    diffs = [abs(losses[names[-1]][s] - losses[names[0]][s]) for s in range(steps)]
    print(f"largest |difference| {max(diffs):.4f}, mean {statistics.mean(diffs):.4f}")
    if heldout:
        with torch.no_grad():
            for name, m in models.items():
                loss, n, correct = forward_loss(m, td.collate(heldout, True, pad_id, share_prefix=True), dtype)
                print(f"{name}: held-out loss {loss.item() / n:.4f}, next-token accuracy {int(correct) / n:.3f} "
                      f"on {len(heldout)} test rows' answers after {steps} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--ab", default="", help="Comma-separated variants: rowsN, threads1, peftcast, sdpa, noprefix, topN, int8.")
    p.add_argument("--system", choices=["default", "demo"], default="default",
                   help="The rows' system prompt: the template's default one, or the demo's.")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="Compile the layers first, as --compile on does.")
    p.add_argument("--parity", type=int, default=0, help="Train this many steps on fp32 and int8 bases; print losses.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = p.parse_args()
    from tunesmith.flows.demo import SYSTEM
    from tunesmith.models.hardware import detect_machine

    model, examples, dtype, pad_id = setup(1000, SYSTEM if args.system == "demo" else None, args.precision)
    print(f"machine: {detect_machine().describe()}; precision {str(dtype).replace('torch.', '')}", flush=True)
    twin = int8_copy(model) if (args.parity and not any(v.startswith("top") for v in args.ab.split(","))) \
        or "int8" in args.ab.split(",") else None
    # topN: the same model built with LoRA on its last N decoder layers only (--lora-layers N)
    tops = {v: setup(1000, SYSTEM if args.system == "demo" else None, args.precision, int(v[3:]))[0]
            for v in args.ab.split(",") if v.startswith("top")}
    if args.compile:
        from tunesmith.train.model import compile_layers

        compile_layers(model)
    if args.profile:
        profile(model, examples, dtype, pad_id)
    if args.ab and args.rounds:
        ab(model, examples, dtype, pad_id, args.ab.split(","), args.rounds, twin, tops)
    if args.parity and tops:  # LoRA on all layers against the topN variants, on shuffled rows of every intent
        import random

        _, rows, _, _ = setup(5000, SYSTEM if args.system == "demo" else None, args.precision, model=False)
        rows = random.Random(0).sample(rows, len(rows))  # the whole file: setup's 1000 rows hold 25 intents
        _, test, _, _ = setup(1000, SYSTEM if args.system == "demo" else None, args.precision, data=TEST, model=False)
        parity({"all layers": model, **tops}, rows, dtype, pad_id, args.parity,
               random.Random(1).sample(test, 64))
    elif args.parity:
        parity({f"{str(dtype).replace('torch.', '')} base": model, "int8 base": twin}, examples, dtype, pad_id,
               args.parity)


if __name__ == "__main__":
    main()
