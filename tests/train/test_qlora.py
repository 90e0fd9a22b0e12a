"""QLoRA: the refusal without CUDA, and the NF4 model, its training step, adapter and serving.

The command refuses --method qlora on a machine without CUDA (tested on every machine
without one). bitsandbytes 0.50 also runs NF4 layers on CPU, so wherever it is installed
(`pip install 'tunesmith[gpu]'`) the `nf4` tests build the QLoRA model through the
trainer's own `build_model` with its test-only flag (on CUDA when there is one, else on
CPU), take real training steps, export and serve the adapter; the `gpu` tests run the
real command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from in_process import run_tunesmith

from tunesmith.train.config import TrainConfig

TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]
REFUSAL = "error: --method qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none: use --method lora"
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    """Where build_model puts a QLoRA base: the GPU when there is one."""
    return "cuda" if cuda() else "cpu"


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of France? {i}"},
                          {"role": "assistant", "content": f"Paris. {i % 3}"}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_refuses_qlora_without_cuda_in_one_sentence(tiny_model_dir, chat_file, tmp_path):
    if cuda():
        pytest.skip("this machine has CUDA: the refusal is for machines without")
    out = tmp_path / "run"
    # the command line in this process (tests/in_process.py); test_train_run.py runs the real one
    proc = run_tunesmith("train", "--model", tiny_model_dir, "--data", chat_file, "--method", "qlora", "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.strip() == REFUSAL
    assert not out.exists(), "a refused run must write nothing"


def test_qlora_refusals_name_the_fix(tiny_model_dir, monkeypatch):
    import torch

    from tunesmith.errors import UsageError
    from tunesmith.models import quantization
    from tunesmith.models.registry import ModelRef, resolve_model
    from tunesmith.train.model import check_qlora

    cfg = TrainConfig(data="x.jsonl", method="qlora", distributed_strategy="fsdp")
    # a CUDA machine without bitsandbytes: how to install it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert quantization.nf4_problems() == [
        "NF4 quantization needs bitsandbytes, which is not installed: pip install 'tunesmith[gpu]'"]
    # every problem at once, one line: no bitsandbytes, a GGUF base, FSDP
    gguf = ModelRef(name="model.gguf", path=Path("."), gguf_file="model.gguf")
    with pytest.raises(UsageError) as err:
        check_qlora(cfg, gguf, world_size=2)
    message = str(err.value)
    assert "pip install 'tunesmith[gpu]'" in message and "is a GGUF file" in message
    assert "use --distributed-strategy ddp" in message and "\n" not in message
    # one process: fsdp is not in play, and a safetensors folder is fine
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    if real_find_spec("bitsandbytes") is not None:
        check_qlora(cfg, resolve_model(str(tiny_model_dir)), world_size=1)


# ----------------------------------------------------------------------------- NF4, also on CPU

nf4 = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'tunesmith[gpu]'); it runs NF4 layers on CPU too",
)


def build_qlora(model_dir: Path, data: Path, compute_dtype, **kw):
    """The trainer's QLoRA model, built through the test-only flag (on CPU where there is no GPU)."""
    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model

    cfg = TrainConfig(model=str(model_dir), data=data, method="qlora", lora_rank=4, **kw)
    return cfg, build_model(resolve_model(str(model_dir)), cfg, compute_dtype, qlora_needs_cuda=False)


def train_steps(model, cfg, tokenizer, data: Path, compute_dtype, steps: int) -> list[float]:
    """`steps` optimizer steps on the same 8 examples, through the trainer's own step code."""
    import torch

    from tunesmith.data.formats import ColumnMapping
    from tunesmith.train import data as td
    from tunesmith.train.model import trainable_parameters
    from tunesmith.train.run import accumulate_gradients

    examples, _ = td.render_and_filter(tokenizer, td.load_examples(data, None, ColumnMapping("text", None, None)),
                                       cfg.max_seq_len, str(data))
    batch = examples[:8]
    targets = td.trained_tokens(batch)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_sum, _ = accumulate_gradients(model, batch, targets, cfg, tokenizer.pad_token_id, compute_dtype, device())
        optimizer.step()
        losses.append(loss_sum / targets)
    return losses


def save_qlora_run(model, run: Path, model_dir: Path, compute_dtype) -> Path:
    """A run directory laid out as `tunesmith train --method qlora` leaves it."""
    from tunesmith.models.quantization import nf4_record
    from tunesmith.models.registry import identity, resolve_model

    ident = identity(resolve_model(str(model_dir)))
    model.save_pretrained(str(run / "adapter"), safe_serialization=True)
    meta = {"base_model": ident, "method": "qlora", "step": 3, "base_quantization": nf4_record(compute_dtype)}
    (run / "adapter" / "tunesmith_adapter.json").write_text(json.dumps(meta))
    (run / "run.json").write_text(json.dumps({"config": {"model": str(model_dir)}, "base_model": ident}))
    return run


@nf4
def test_nf4_model_is_4bit_and_training_steps_lower_the_loss(tiny_model_dir, tiny_tokenizer, chat_file):
    import bitsandbytes as bnb
    import torch

    from tunesmith.train.model import parameter_count, trainable_parameters

    cfg, model = build_qlora(tiny_model_dir, chat_file, torch.bfloat16)
    lm = model.get_base_model()
    # peft wraps each one: model.layers.0.self_attn.q_proj.base_layer
    quantized = {n.split(".")[-2] for n, m in lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == ALL_LINEAR and not isinstance(lm.lm_head, bnb.nn.Linear4bit)
    assert all(m.weight.quant_type == "nf4" and m.weight.compress_statistics
               for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit))
    trainable = trainable_parameters(model)
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    # the frozen rest stays in the compute dtype (no fp32 upcast, see load_qlora_base)
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16 and lm.model.norm.weight.dtype == torch.bfloat16
    # a 4-bit weight counts as its number of weights, not of bytes
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    lora_params = sum(p.numel() for _, p in trainable)
    assert parameter_count(model) == sum(p.numel() for p in plain.parameters()) + lora_params

    losses = train_steps(model, cfg, tiny_tokenizer, chat_file, torch.bfloat16, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def qlora_run_fp32(tmp_path_factory, tiny_model_dir, tiny_tokenizer, chat_file) -> Path:
    """A QLoRA run trained in fp32 (3 steps), so merged and unmerged models differ only by rounding."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    cfg, model = build_qlora(tiny_model_dir, chat_file, torch.float32)
    train_steps(model, cfg, tiny_tokenizer, chat_file, torch.float32, steps=3)
    return save_qlora_run(model, tmp_path_factory.mktemp("runs") / "qlora", tiny_model_dir, torch.float32)


def logits(model, tokenizer, prompts=("What is the capital of France?", "The quick brown fox 0123456789")):
    import torch

    with torch.no_grad():
        return [model(input_ids=tokenizer(p, return_tensors="pt")["input_ids"].to(model.device)).logits[0].float().cpu()
                for p in prompts]


def max_diff(a_rows, b_rows) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(a_rows, b_rows))


@nf4
def test_nf4_export_merges_into_the_base_as_trained(qlora_run_fp32, tiny_model_dir, tiny_tokenizer, tmp_path):
    """The export (default --merge-base nf4) computes what the QLoRA run trained: the NF4 base + adapter.

    fp32 throughout, so the merged and unmerged models hold the same numbers, only added
    in another order ((W + sBA)x against Wx + sB(Ax)): fp32 rounding, ~1e-6 on these
    logits of about 1, hence 1e-4. Merging into the original weights instead is off by the
    NF4 error (about a tenth of each weight), far above that: the test tells them apart.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.models.export import export_run
    from tunesmith.models.quantization import load_nf4_model
    from tunesmith.models.registry import resolve_model

    ref = resolve_model(str(tiny_model_dir))
    trained = PeftModel.from_pretrained(load_nf4_model(ref, torch.float32, device()), str(qlora_run_fp32 / "adapter"))
    # Training mode (no dropout anywhere here, so deterministic): in eval mode on a CPU with
    # AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 inference kernel (~2e-3 off
    # on these logits); in training mode it dequantizes and multiplies in fp32, as on CUDA.
    trained.train()
    want = logits(trained, tiny_tokenizer)

    result = export_run(qlora_run_fp32, format="hf", out=tmp_path / "nf4", log=lambda _: None)
    meta = json.loads((result.out / "tunesmith_export.json").read_text())
    assert meta["merge_base"] == "nf4" and meta["adapter_meta"]["base_quantization"]["quant_type"] == "nf4"
    merged = AutoModelForCausalLM.from_pretrained(str(result.out), dtype=torch.float32, use_safetensors=True).eval()
    assert not hasattr(merged.config, "quantization_config")
    assert max_diff(logits(merged, tiny_tokenizer), want) < 1e-4

    original = export_run(qlora_run_fp32, format="hf", out=tmp_path / "original", merge_base="original", log=lambda _: None)
    on_original = AutoModelForCausalLM.from_pretrained(str(original.out), dtype=torch.float32, use_safetensors=True).eval()
    assert max_diff(logits(on_original, tiny_tokenizer), want) > 1e-2
    # and the adapter matters: the merged model is not the NF4 base alone
    with trained.disable_adapter():
        assert max_diff(logits(merged, tiny_tokenizer), logits(trained, tiny_tokenizer)) > 1e-2


@nf4
def test_nf4_adapter_is_served_on_the_unquantized_base(qlora_run_fp32, tiny_model_dir, tiny_tokenizer, caplog):
    """A QLoRA adapter is an ordinary peft LoRA adapter: the engine serves it on the full-precision base."""
    import logging

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.generate.engine import LocalEngine, SamplingParams

    adapter_config = json.loads((qlora_run_fp32 / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and {t.split(".")[-1] for t in adapter_config["target_modules"]} == ALL_LINEAR
    caplog.set_level(logging.INFO, logger="tunesmith.serve")
    engine = LocalEngine.load(str(tiny_model_dir), [("qlora-run", qlora_run_fp32)])
    assert "trained on an NF4-quantized base (QLoRA); it is served on the full-precision base" in caplog.text
    try:
        assert [c.id for c in engine.models()][1:] == ["qlora-run"]
        prompt = engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
        got, _, n_tokens = engine.generate(prompt, "qlora-run", SamplingParams(6, 0.0))
    finally:
        engine.close()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    want_model = PeftModel.from_pretrained(base, str(qlora_run_fp32 / "adapter")).eval()
    with torch.no_grad():
        want = want_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    want_text = tiny_tokenizer.decode(want[0, len(prompt):], skip_special_tokens=True)
    assert n_tokens > 0 and got and want_text.startswith(got), (got, want_text)


# ----------------------------------------------------------------------------- on a CUDA GPU


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNESMITH, *args], capture_output=True, text=True, env=dict(os.environ), timeout=600)


def cli_run(model_dir: Path, data: Path, out: Path, precision: str) -> list[dict]:
    proc = run_cli("train", "--model", str(model_dir), "--data", str(data), "--method", "qlora", "--out", str(out),
                   "--max-steps", "6", "--batch-size", "8", "--learning-rate", "1e-2", "--lora-rank", "4",
                   "--precision", precision, "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
def test_gpu_qlora_command_trains_an_nf4_base(tiny_model_dir, chat_file, tmp_path):
    import bitsandbytes as bnb
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model

    rows = cli_run(tiny_model_dir, chat_file, tmp_path / "run", "auto")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.1, rows
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    meta = json.loads((tmp_path / "run" / "adapter" / "tunesmith_adapter.json").read_text())
    assert info["base_quantization"] == meta["base_quantization"]
    assert meta["method"] == "qlora" and meta["base_quantization"]["quant_type"] == "nf4"
    assert meta["base_quantization"]["dtype"] == info["resolved"]["precision"] == "bfloat16"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # the builder the command used, without the test-only flag: the base's linear layers are NF4 on the GPU
    cfg = TrainConfig(model=str(tiny_model_dir), data=chat_file, method="qlora")
    model = build_model(resolve_model(str(tiny_model_dir)), cfg, torch.bfloat16)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * len(ALL_LINEAR)
    assert all(m.weight.device.type == "cuda" and m.weight.quant_type == "nf4" for m in linear4)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.gpu
def test_gpu_qlora_export_matches_the_unmerged_model(tiny_model_dir, chat_file, tiny_tokenizer, tmp_path):
    """Same check as the CPU one, on CUDA's kernels, after a real `tunesmith train --method qlora`
    run in fp32 (so merged and unmerged differ by fp32 rounding only: 1e-4, as there)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.models.quantization import load_nf4_model
    from tunesmith.models.registry import resolve_model

    run = tmp_path / "run"
    cli_run(tiny_model_dir, chat_file, run, "fp32")
    base = load_nf4_model(resolve_model(str(tiny_model_dir)), torch.float32, torch.cuda.current_device())
    trained = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    want = logits(trained, tiny_tokenizer)
    exported = {}
    for merge_base in ("nf4", "original"):
        proc = run_cli("export", str(run), "--format", "hf", "--out", str(tmp_path / merge_base),
                       "--merge-base", merge_base)
        assert proc.returncode == 0, proc.stderr
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / merge_base), dtype=torch.float32).eval()
        exported[merge_base] = max_diff(logits(merged, tiny_tokenizer), want)
    assert exported["nf4"] < 1e-4 and exported["original"] > 1e-2, exported



@pytest.mark.gpu
def test_gpu_cpu_and_cuda_quantize_nf4_alike(tiny_model_dir):
    """Export on a CPU machine rebuilds the NF4 base with bitsandbytes' CPU kernels: the same
    weights as CUDA's? (The block scales are quantized after subtracting their mean, a sum
    whose order may differ.) If this fails, say so in docs/export.md and export on a GPU."""
    import torch

    from tunesmith.models.quantization import load_nf4_model
    from tunesmith.models.registry import resolve_model

    ref = resolve_model(str(tiny_model_dir))
    on_cpu = load_nf4_model(ref, torch.bfloat16, "cpu").dequantize().state_dict()
    on_gpu = load_nf4_model(ref, torch.bfloat16, torch.cuda.current_device()).dequantize().state_dict()
    differ = [k for k in on_cpu if not torch.equal(on_cpu[k], on_gpu[k].cpu())]
    assert not differ, differ
