"""QLoRA: the refusal without CUDA, and the NF4 model, its training step, adapter and serving.

The command refuses --method qlora on a machine without CUDA (tested on every machine
without one). bitsandbytes 0.50 also runs NF4 layers on CPU, so where it is installed
(`pip install 'tunesmith[gpu]'`) the tests marked `nf4_cpu` build the QLoRA model through
the trainer's own `build_model` with its test-only flag, take real training steps and
serve the adapter; the GPU tests run the real command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.train.config import TrainConfig

TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]
REFUSAL = "error: --method qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none: use --method lora"
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    proc = subprocess.run([*TUNESMITH, "train", "--model", str(tiny_model_dir), "--data", str(chat_file),
                           "--method", "qlora", "--out", str(out)], capture_output=True, text=True, env=dict(os.environ))
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


# ----------------------------------------------------------------------------- NF4 on CPU

nf4_cpu = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'tunesmith[gpu]'); it runs NF4 layers on CPU too",
)


def build_qlora(model_dir: Path, data: Path, compute_dtype, **kw):
    """The trainer's QLoRA model, built on CPU through the test-only flag."""
    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model

    cfg = TrainConfig(model=str(model_dir), data=data, method="qlora", lora_rank=4, **kw)
    return cfg, build_model(resolve_model(str(model_dir)), cfg, compute_dtype, qlora_needs_cuda=False)


def train_steps(model, cfg, tokenizer, data: Path, compute_dtype, steps: int, device: str = "cpu") -> list[float]:
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
        loss_sum, _ = accumulate_gradients(model, batch, targets, cfg, tokenizer.pad_token_id, compute_dtype, device)
        optimizer.step()
        losses.append(loss_sum / targets)
    return losses


@nf4_cpu
def test_nf4_cpu_model_is_4bit_and_a_training_step_lowers_the_loss(tiny_model_dir, tiny_tokenizer, chat_file):
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
