"""Packing isolation, loss normalisation over micro-batches, precision choice."""

from __future__ import annotations

import pytest

from tunesmith.data.example import chat
from tunesmith.errors import UsageError
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig
from tunesmith.train.model import check_packable, forward_loss, has_bf16, precision_dtype, use_packed_attention

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("hi", "yo"),
    ("How do I reset my password?", "Please click on forgot password."),
    ("I am still waiting on my card?", "card_arrival"),
    ("The quick brown fox", "jumps over the lazy dog."),
    ("positive or negative?", "neutral"),
    ("label?", "exchange_rate"),
    ("question json", '{"answer": true}'),
]


def _examples(tok):
    kept, _ = td.render_and_filter(tok, [chat(("user", q), ("assistant", a)) for q, a in QUESTIONS], 512, "test")
    return kept


@pytest.mark.parametrize("kernel", ["grouped", "sdpa"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_alone(tiny_tokenizer, attn, kernel, monkeypatch):
    """Logits, loss and gradients of examples packed into one row equal those of each
    example alone (fp32, 1e-4), with either kernel packed attention may pick on the CPU."""
    import torch

    from tiny_model import build_tiny_model
    from tunesmith.train import model as tm

    monkeypatch.setattr(tm, "GROUPED_ATTENTION_MAX_LEN", 512 if kernel == "grouped" else 0)
    examples = _examples(tiny_tokenizer)
    model = build_tiny_model(tiny_tokenizer)
    model.set_attn_implementation(attn)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        padded_loss = forward_loss(model, td.collate(examples, False, 0), torch.float32)[0]
    alone_loss = sum(forward_loss(model, td.collate([e], False, 0), torch.float32)[0] for e in examples)
    alone_loss.backward()
    alone_grads = grads()
    use_packed_attention(model, 512)
    batch = td.collate(examples, True, 0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       pack_index=batch["pack_index"], unpack_index=batch["unpack_index"]).logits[0]
    packed_loss = forward_loss(model, batch, torch.float32)[0]
    packed_loss.backward()
    packed_grads = grads()
    assert packed.shape[0] == sum(len(e) for e in examples)
    assert torch.allclose(packed, torch.cat(alone), atol=1e-4, rtol=0)
    assert abs(packed_loss.item() - alone_loss.item()) < 1e-4 * max(1.0, abs(alone_loss.item()))
    assert abs(padded_loss.item() - alone_loss.item()) < 1e-4 * max(1.0, abs(alone_loss.item()))
    for name, g in alone_grads.items():
        assert torch.allclose(packed_grads[name], g, atol=1e-4, rtol=1e-4), name


def test_grouped_attention_matches_sdpa_with_grouped_heads():
    """The explicit kernel equals torch's SDPA (GQA, causal) in fp32, forward and backward."""
    import torch
    import torch.nn.functional as F

    from tunesmith.train.model import grouped_causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, 7, 8, generator=gen, requires_grad=True) for h in (6, 2, 2))
    ours = grouped_causal_attention(q, k, v, scaling=0.3)
    ours.sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2)
    ref.sum().backward()
    assert ours.shape == (3, 7, 6, 8)
    assert torch.allclose(ours, ref, atol=1e-5)
    for mine, t in zip(ours_grads, (q, k, v)):
        assert torch.allclose(mine, t.grad, atol=1e-5)


def test_packing_refused_where_not_exact():
    from transformers import Gemma2Config, MistralConfig

    with pytest.raises(UsageError, match="sliding window of 16.*--no-packing"):
        check_packable(MistralConfig(sliding_window=16), max_seq_len=64)
    check_packable(MistralConfig(sliding_window=4096), max_seq_len=64)
    with pytest.raises(UsageError, match="model type 'gemma2'.*--no-packing"):
        check_packable(Gemma2Config(), max_seq_len=64)


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_equals_one_batch(tiny_model_dir, tiny_tokenizer, packing):
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model, trainable_parameters
    from tunesmith.train.run import accumulate_gradients

    examples = _examples(tiny_tokenizer)
    n_targets = td.trained_tokens(examples)
    grads = {}
    for micro in (None, 2):
        cfg = TrainConfig(data="x.jsonl", model=str(tiny_model_dir), precision="fp32", lora_dropout=0.0,
                          packing=packing, micro_batch_size=micro, batch_size=len(examples))
        torch.manual_seed(0)
        model = build_model(resolve_model(cfg.model), cfg, torch.float32)
        for _, p in trainable_parameters(model):  # LoRA B starts at zero; make every grad non-trivial
            p.data.normal_(0, 0.1)
        accumulate_gradients(model, examples, n_targets, cfg, 0, torch.float32, "cpu")
        grads[micro] = torch.cat([p.grad.reshape(-1) for _, p in trainable_parameters(model)])
    assert grads[None].abs().max() > 1e-4
    assert torch.allclose(grads[2], grads[None], atol=1e-5, rtol=0)
    # The bug this guards against: averaging each micro-batch's mean gives different gradients
    # when micro-batches hold different numbers of trained tokens.
    counts = [td.trained_tokens(examples[i : i + 2]) for i in range(0, len(examples), 2)]
    assert len(set(counts)) > 1


def test_precision_auto_follows_hardware():
    import torch

    assert precision_dtype("fp32") == torch.float32
    assert precision_dtype("bf16") == torch.bfloat16
    assert precision_dtype("auto") == (torch.bfloat16 if has_bf16() else torch.float32)


def test_skipping_peft_input_cast_is_exact_under_bf16(tiny_model_dir, tiny_tokenizer):
    """build_model turns off peft's cast of each LoRA input to fp32 under bf16 (a speed
    lever): the loss and every gradient must be bit-identical to peft's default path."""
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model, set_input_casting, trainable_parameters

    cfg = TrainConfig(model=str(tiny_model_dir), data="unused.jsonl", precision="bf16", lora_rank=8)
    torch.manual_seed(0)
    model = build_model(resolve_model(str(tiny_model_dir)), cfg, torch.bfloat16)
    for _, p in trainable_parameters(model):  # peft starts B at zero: give the LoRA path weight
        torch.nn.init.normal_(p, std=0.05)
    batch = td.collate(_examples(tiny_tokenizer), True, tiny_tokenizer.pad_token_id)
    results = []
    for casting in (True, False):
        set_input_casting(model, casting)
        model.zero_grad()
        loss, _, _ = forward_loss(model, batch, torch.bfloat16)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for _, p in trainable_parameters(model)]))
    (loss_on, grads_on), (loss_off, grads_off) = results
    assert torch.equal(loss_on, loss_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    assert any(g.abs().sum() > 0 for g in grads_off)


@pytest.mark.parametrize("kernel", ["grouped", "sdpa"])
def test_shared_prefix_equals_every_example_whole(tiny_tokenizer, kernel, monkeypatch):
    """With a common system prompt, the prefix computed once (collate share_prefix) gives the
    same logits at every kept position, loss and gradients as each example packed whole."""
    import torch

    from tiny_model import build_tiny_model
    from tunesmith.train import model as tm

    monkeypatch.setattr(tm, "GROUPED_ATTENTION_MAX_LEN", 512 if kernel == "grouped" else 0)
    system = "Classify the banking customer query into its intent label."
    examples, _ = td.render_and_filter(
        tiny_tokenizer, [chat(("system", system), ("user", q), ("assistant", a)) for q, a in QUESTIONS], 512, "test")
    model = build_tiny_model(tiny_tokenizer)
    use_packed_attention(model, 512)
    results = {}
    for share in (False, True):
        batch = td.collate(examples, True, 0, share_prefix=share)
        loss, n, correct = forward_loss(model, batch, torch.float32)
        loss.backward()
        results[share] = (batch, loss.item(), n, int(correct),
                          {k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    whole, shared = results[False][0], results[True][0]
    prefix = shared["shared_prefix"]
    assert prefix == td.shared_prefix_len(examples) >= td.MIN_SHARED_PREFIX
    assert shared["tokens"] == whole["tokens"] == sum(len(e) for e in examples)
    assert shared["computed_tokens"] == whole["tokens"] - (len(examples) - 1) * prefix
    assert results[True][2:4] == results[False][2:4]
    assert abs(results[True][1] - results[False][1]) < 1e-4 * max(1.0, abs(results[False][1]))
    for name, g in results[False][4].items():
        assert torch.allclose(results[True][4][name], g, atol=1e-4, rtol=1e-4), name


def test_shared_prefix_stops_at_the_first_target_and_difference():
    from tunesmith.data.render import IGNORE_INDEX, TokenizedExample

    def ex(ids, trained_from):
        return TokenizedExample(ids, [IGNORE_INDEX] * trained_from + ids[trained_from:])

    same = [ex([1, 2, 3, 4, 5, 6, 7, 8], 7), ex([1, 2, 3, 4, 5, 6, 9, 9, 9], 7)]
    assert td.shared_prefix_len(same) == 6
    # A target inside the common part cuts the prefix before the position that predicts it.
    assert td.shared_prefix_len([ex([1, 2, 3, 4, 5, 6, 7, 8], 5), ex([1, 2, 3, 4, 5, 6, 9, 9], 7)]) == 4
    # Too short, different from the first token, or one example: nothing shared.
    assert td.shared_prefix_len([ex([1, 2, 3, 7], 3), ex([1, 2, 3, 8], 3)]) == 0
    assert td.shared_prefix_len([ex([5, 2, 3, 4, 5, 6, 7], 6), ex([1, 2, 3, 4, 5, 6, 7], 6)]) == 0
    assert td.shared_prefix_len(same[:1]) == 0
    # Every example keeps at least one token of its own.
    assert td.shared_prefix_len([ex([1, 2, 3, 4, 5, 6], 6), ex([1, 2, 3, 4, 5, 6, 7], 6)]) == 5


def test_lora_layers_adapts_only_the_top_layers_and_backward_stops_below_them(tiny_model_dir, tiny_tokenizer):
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model, trainable_parameters

    cfg = TrainConfig(data="x.jsonl", model=str(tiny_model_dir), precision="fp32", lora_layers=1)
    model = build_model(resolve_model(cfg.model), cfg, torch.float32)
    names = [n for n, _ in trainable_parameters(model)]
    # Every linear layer of the last decoder layer (of 2), none of the first.
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".layers.1.")[1].split(".lora_")[0] for n in names} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    layers = model.get_base_model().model.layers
    needs_grad = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad
                                         if isinstance(out, tuple) else out.requires_grad))
             for i, layer in enumerate(layers)]
    loss, n, _ = forward_loss(model, td.collate(_examples(tiny_tokenizer), True, tiny_tokenizer.pad_token_id),
                              torch.float32)
    (loss / n).backward()
    for h in hooks:
        h.remove()
    assert needs_grad == {0: False, 1: True}  # no graph kept below the adapted layer
    assert all(p.grad is not None for _, p in trainable_parameters(model))


def test_lora_layers_refuses_more_layers_than_the_model_has(tiny_model_dir):
    import torch
    from pydantic import ValidationError

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model

    with pytest.raises(UsageError, match="--lora-layers 3: llama has 2 decoder layers"):
        build_model(resolve_model(str(tiny_model_dir)),
                    TrainConfig(data="x.jsonl", model=str(tiny_model_dir), precision="fp32", lora_layers=3), torch.float32)
    with pytest.raises(ValidationError, match="must be at least 1"):
        TrainConfig(data="x.jsonl", lora_layers=0)
