"""Weight-only int8 for the frozen base (models/int8.py): the layer's maths, both inference
kernels, LoRA training on an int8 base against fp32, and `--weights int8` through the engine."""

from __future__ import annotations

import pytest

from tunesmith.errors import UsageError
from tunesmith.models.inference import load_for_inference

QUESTIONS = ["What is the capital of France?", "I am still waiting on my card?", "How do I reset my password?",
             "The quick brown fox", "positive or negative?", "label answer question", "json true false null",
             "card_arrival card_linking exchange_rate", "0123456789", "Please click on forgot password.",
             "You are a helpful AI assistant", "system user assistant tool"]


def _layer(seed: int = 0, bias: bool = True):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(96, 48, bias=bias)


def test_weights_are_int8_per_output_row_and_close_to_fp32():
    import torch

    from tunesmith.models.int8 import Int8Linear

    fp = _layer()
    q = Int8Linear.from_linear(fp)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 96) and not q.weight.requires_grad
    assert q.scale.dtype == torch.float32 and q.scale.shape == (48,)
    assert int(q.weight.abs().amax(dim=1).min()) >= 126  # every row uses its full range
    # one quantization step is at most half a scale per weight
    assert (q.dequantized() - fp.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    x = torch.randn(5, 96)
    with torch.no_grad():
        want, got = fp(x), q(x)
    assert torch.allclose(got, want, atol=0.02 * want.abs().max().item())


def test_training_matmul_is_the_dequantized_weights_and_only_x_gets_a_gradient():
    import torch

    from tunesmith.models.int8 import Int8Linear

    q = Int8Linear.from_linear(_layer())
    w = q.dequantized()
    x = torch.randn(3, 7, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(3, 7, 48)
    y = q(x)
    (y * upstream).sum().backward()
    y_ref = torch.nn.functional.linear(x_ref, w, q.bias)
    (y_ref * upstream).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert q.weight.grad is None and q.bias.grad is None


def test_inference_kernels_agree_and_a_row_does_not_depend_on_its_batch():
    import torch

    from tunesmith.models.int8 import PACKED_MAX_ROWS, Int8Linear

    q = Int8Linear.from_linear(_layer(bias=False))
    x = torch.randn(PACKED_MAX_ROWS * 3, 96)
    with torch.no_grad():
        packed = q(x[:4])  # decode-sized: torch's int8 weight kernel
        big = q(x)  # prefill-sized: dequantized matmul, rounded as the kernel rounds
        alone = torch.cat([q(x[i:i + 1]) for i in range(4)])
        exact = torch.nn.functional.linear(x[:4].bfloat16().float(), q.dequantized())
    assert torch.equal(packed, alone)
    # both are bf16(x) @ W_int8^T * scale in fp32, rounded to bf16: they differ by the order of
    # an fp32 sum at most, i.e. one bf16 rounding step
    assert torch.allclose(packed, big[:4], rtol=2 ** -7, atol=1e-3)
    assert torch.allclose(packed, exact, rtol=2 ** -7, atol=1e-3)


def _lora_model(tiny_tokenizer, int8: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    from tiny_model import build_tiny_model
    from tunesmith.models.int8 import quantize_frozen_linears

    model = build_tiny_model(tiny_tokenizer)
    with torch.no_grad():  # learnable logits (see tiny_model.save_learnable_tiny_model)
        model.get_input_embeddings().weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    swapped = quantize_frozen_linears(model) if int8 else 0
    return model.train(), swapped


def test_quantize_swaps_the_frozen_base_and_never_lora(tiny_tokenizer):
    import torch

    from tunesmith.models.int8 import Int8Linear

    model, swapped = _lora_model(tiny_tokenizer, int8=True)
    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    # 2 layers x 7 projections, each the base_layer inside its LoRA wrapper; the LM head stays fp32
    assert swapped == len(int8) == 14 and all(n.endswith(".base_layer") for n in int8)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    lora = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 28 and all(type(m) is torch.nn.Linear and m.weight.requires_grad for m in lora)


def test_lora_on_an_int8_base_trains_like_fp32(tiny_tokenizer):
    """Same seed, same batch, five AdamW steps: the LoRA gradients flow and the losses track fp32's."""
    import torch

    ids = tiny_tokenizer([f"<|im_start|>user\n{q}<|im_end|>\n" for q in QUESTIONS[:8]], padding=True,
                         return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    losses = {}
    for int8 in (False, True):
        model, _ = _lora_model(tiny_tokenizer, int8)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses[int8] = []
        for step in range(5):
            loss = model(**ids, labels=labels).loss
            loss.backward()
            if step == 0:  # lora_B starts at zero: its gradient is what moves the adapter
                grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
                assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
            opt.step()
            opt.zero_grad()
            losses[int8].append(loss.item())
    fp32, int8 = losses[False], losses[True]
    assert int8[-1] < int8[0] - 0.1, int8  # it learns
    assert all(abs(a - b) <= 0.01 * a for a, b in zip(fp32, int8)), (fp32, int8)


def test_greedy_answers_agree_with_fp32_through_the_engine(tiny_tokenizer, tmp_path):
    """A random tiny model is chaotic (a rounding anywhere changes every later token), so the
    check is the first greedy token of each prompt: the same as fp32's wherever fp32's own
    choice is not a near tie, and on all but at most one prompt. The real model's full
    answers are compared by bench/int8_inference.py."""
    import torch

    from tiny_model import build_varied_model
    from tunesmith.data.example import Message
    from tunesmith.data.render import render_prompt
    from tunesmith.evaluate.evaluation import generate_greedy

    varied = tmp_path / "varied"  # greedy answers differ from prompt to prompt (see build_varied_model)
    build_varied_model(tiny_tokenizer).save_pretrained(varied)
    tiny_tokenizer.save_pretrained(varied)
    prompts = [[Message("user", q)] for q in QUESTIONS]
    first, margin = {}, []
    for weights in ("fp32", "int8"):
        loaded = load_for_inference(varied, weights=weights)
        assert loaded.weights == weights
        first[weights] = [g.text for g in generate_greedy(loaded, prompts, max_new_tokens=1, batch_size=4)]
        if weights == "fp32":
            with torch.no_grad():
                for p in prompts:
                    logits = loaded.model(torch.tensor([render_prompt(tiny_tokenizer, p)])).logits[0, -1]
                    top2 = logits.topk(2).values
                    margin.append(float((top2[0] - top2[1]) / (logits.max() - logits.min())))
    assert len(set(first["fp32"])) >= 4, "the answers must vary for agreement to mean something"
    same = [a == b for a, b in zip(first["fp32"], first["int8"])]
    assert sum(same) >= len(QUESTIONS) - 1, first
    assert all(ok or m < 0.02 for ok, m in zip(same, margin)), (first, margin)


def test_an_adapter_goes_onto_an_int8_base(tiny_model_dir, adapter_dirs):
    from tunesmith.generate.engine import LocalEngine, SamplingParams

    engine = LocalEngine.load(str(tiny_model_dir), [("alpha", adapter_dirs["alpha"])], weights="int8")
    try:
        ids = engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        base, tuned = engine.generate(ids, engine.base_id, greedy), engine.generate(ids, "alpha", greedy)
        engine.add_adapter("beta", adapter_dirs["beta"])  # added to a base that is int8 already
        later = engine.generate(ids, "beta", greedy)
    finally:
        engine.close()
    assert base[0] != tuned[0] and later[0] not in (base[0], tuned[0])


def test_unknown_weights_are_refused_before_loading(tiny_model_dir):
    with pytest.raises(UsageError, match="unknown --weights 'int4'; accepted: fp32, int8"):
        load_for_inference(tiny_model_dir, weights="int4")
