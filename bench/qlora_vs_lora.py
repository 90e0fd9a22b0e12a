"""QLoRA against LoRA on one CUDA GPU: GPU memory and training tokens/s, same model, data and steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/qlora_vs_lora.py --steps 30

Each method trains in a child process of its own (so each peak is its own) through
tunesmith's own `train()`: SmolLM2-135M-Instruct, the first steps x batch banking77 rows,
batch 16, LoRA r=16 on all linear layers, --precision auto (bf16 on the GPU). Per method
it prints the GPU memory the built model holds (`torch.cuda.memory_allocated` after
build_model: frozen base + LoRA weights), the peak over the whole run
(`torch.cuda.max_memory_allocated`: weights, activations, gradients, AdamW state),
training tokens/s (trained tokens per second of training, from the run) and the last loss.

Where SmolLM2's weights cannot be had (the lent GPU machines reach no network and take at
most 64 MiB of files along, the weights are 538 MB), save its shape here and let the GPU
machine build a model of exactly that shape with random weights: memory and speed depend
on shapes and dtypes, not on the values (the losses then mean nothing):

    .venv/bin/python bench/qlora_vs_lora.py --save-shape .cache/smollm2-shape     # here: config + tokenizer, 3.5 MB
    python3 bench/qlora_vs_lora.py --random-weights .cache/smollm2-shape --steps 30   # there

docs/benchmarks.md has the whole recipe for a lent GPU machine (the wheels to carry).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from train_throughput import write_rows  # the same banking77 rows (bench/ is on sys.path when run)

MODEL = "smollm2-135m-instruct"
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
METHODS = ("lora", "qlora")
SEED = 42


def save_shape(dest: Path) -> None:
    """SmolLM2's config and tokenizer, no weights: all a GPU machine needs to rebuild its shape."""
    from tunesmith.models.registry import resolve_model

    src = Path(resolve_model(MODEL).path)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    print(f"saved {', '.join(p.name for p in sorted(dest.iterdir()))} to {dest}")


def random_model(shape: Path, dest: Path) -> Path:
    """A model of `shape`'s architecture with random weights, saved as safetensors in `dest`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(str(shape))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(dest), safe_serialization=True)
    for name in SHAPE_FILES:
        if (shape / name).is_file() and not (dest / name).exists():
            shutil.copy2(shape / name, dest / name)
    return dest


def child(args) -> None:
    """One method: build once to measure the model, then a whole training run from zero."""
    import gc

    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.model import build_model, parameter_count, precision_dtype
    from tunesmith.train.run import train

    cfg = TrainConfig(model=args.model, data=args.data, input_column="text", output_column="category",
                      method=args.method, max_steps=args.steps, batch_size=args.batch_size,
                      max_seq_len=args.max_seq_len, seed=SEED, out=args.out)
    model = build_model(resolve_model(cfg.model), cfg, precision_dtype(cfg.precision)).to("cuda")
    model_bytes, n_params = torch.cuda.memory_allocated(), parameter_count(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg, progress=False)
    print("RESULT " + json.dumps({
        "method": args.method, "model_gb": model_bytes / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "tokens_per_s": result.metrics["tokens_per_s"], "train_loss": result.metrics["train_loss"],
        "parameters": n_params, "device": torch.cuda.get_device_name(),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--random-weights", type=Path, help="folder from --save-shape: a random model of that shape")
    parser.add_argument("--save-shape", type=Path, help="write SmolLM2's config and tokenizer here, then exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_shape:
        return save_shape(args.save_shape)
    if args.child:
        args.method = args.child
        return child(args)

    import torch

    if not torch.cuda.is_available():
        sys.exit("this benchmark measures GPU memory: it needs a CUDA GPU (and pip install 'tunesmith[gpu]')")
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        tmp_path = Path(tmp)
        model = str(random_model(args.random_weights, tmp_path / "model")) if args.random_weights else args.model
        data = write_rows(args.steps * args.batch_size, tmp_path / "train.csv")
        print(f"{'random weights of the shape in ' + str(args.random_weights) if args.random_weights else model}; "
              f"{args.steps} steps of {args.batch_size} banking77 rows, max length {args.max_seq_len}, bf16 compute")
        print("| method | model on GPU (GB) | peak GPU memory (GB) | tokens/s | last loss |\n| --- | ---: | ---: | ---: | ---: |")
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--model", model, "--data", str(data),
                   "--out", str(tmp_path / method), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-seq-len", str(args.max_seq_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                print(f"| {method} | failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1]} | | | |")
                continue
            r = json.loads(found[0][len("RESULT "):])
            print(f"| {method} | {r['model_gb']:.3f} | {r['peak_gb']:.3f} | {r['tokens_per_s']:.0f} | {r['train_loss']:.3f} |",
                  flush=True)
        print(f"device: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
