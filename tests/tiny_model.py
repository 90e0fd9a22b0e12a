"""A tiny random Llama, a ChatML tokenizer and LoRA adapters, built locally and offline for tests.

Imported by tests as `from tiny_model import ...` (a plain module: a `conftest` import would
find whichever conftest.py pytest loaded last).
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTERS = ("alpha", "beta", "gamma")
"""The adapters the shared `engine` fixture serves on the tiny model."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant tool",
    "What is the capital of France? The capital of France is Paris.",
    "I am still waiting on my card? card_arrival card_linking exchange_rate",
    "How do I reset my password? Please click on forgot password.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {}[]:,\"'",
    "positive negative neutral label answer question json true false null",
] * 20


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens and SmolLM2's template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0):
    """A 2-layer Llama with random weights sized to the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def build_varied_model(tokenizer, seed: int = 0, tied: bool = True):
    """A 2-layer Llama with large random weights: greedy outputs differ from prompt to
    prompt (the default 0.02 init repeats one token), which generation tests need."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=gen)
    return model


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_learnable_tiny_model(path: Path) -> Path:
    """The tiny Llama with embeddings at std 0.5 instead of 0.02, for tests that must learn a
    task with LoRA: LoRA does not train the (tied) embeddings, and at 0.02 the logits can
    never leave near-uniform (loss ~4.9)."""
    import torch

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def make_adapter(base_dir: Path, out: Path, seed: int, scale: float = 0.5, base_sha: str | None = None) -> Path:
    """A LoRA adapter on base_dir with random non-zero lora_B (so adapters differ), saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)  # lora_A's init draws from the global RNG: same adapter whatever ran before
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    if base_sha:
        (out / "tunesmith_adapter.json").write_text(json.dumps({"base_model": {"name": "other", "sha256": base_sha}}))
    return out
