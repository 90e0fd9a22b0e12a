"""Batched greedy generation and reference loss against transformers' own implementations."""

from __future__ import annotations

import pytest

from eval_helpers import build_varied_model
from tunesmith.data.example import Message, chat
from tunesmith.data.render import end_of_turn_ids, render_example, render_prompt
from tunesmith.evaluate.generate import generate, generate_ids, reference_loss

QUESTIONS = [
    "What is the capital of France?",
    "card",
    "How do I reset my password? Please click on forgot password.",
    "json true",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def _hf_greedy(model, tokenizer, ids, n):
    import torch

    stop = end_of_turn_ids(tokenizer)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
    )[0, len(ids):].tolist()
    return [t for t in out if t not in stop]


def test_batched_left_padded_generation_equals_one_row_at_a_time(tiny_tokenizer):
    model = build_varied_model(tiny_tokenizer, seed=0)
    prompts = [[Message("user", q)] for q in QUESTIONS]
    ids = [render_prompt(tiny_tokenizer, p) for p in prompts]
    assert len({len(i) for i in ids}) > 1  # different lengths, so the batch is padded
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=5, precision="fp32")
    for p, g in zip(ids, batched):
        expected = _hf_greedy(model, tiny_tokenizer, p, 8)
        assert g.completion_tokens == len(expected)
        assert g.text == tiny_tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert g.prompt_tokens == len(p)
        assert g.latency_s > 0
    assert len({g.text for g in batched}) > 1


def test_generation_stops_at_end_of_turn(tiny_tokenizer):
    import torch

    model = build_varied_model(tiny_tokenizer, seed=2, tied=False)
    ids = render_prompt(tiny_tokenizer, [Message("user", QUESTIONS[0])])
    first, second = _hf_greedy(model, tiny_tokenizer, ids, 2)[:2]
    (stop,) = end_of_turn_ids(tiny_tokenizer)
    # Swap the output rows of the second greedy token and <|im_end|>: the model now ends
    # its turn right after the first token.
    with torch.no_grad():
        w = model.lm_head.weight
        w[[second, stop]] = w[[stop, second]]
    (g,) = generate_ids(model, tiny_tokenizer, [ids], max_new_tokens=10, precision="fp32")
    assert g.completion_tokens == 1
    assert g.text == tiny_tokenizer.decode([first], skip_special_tokens=True).strip()


def test_max_new_tokens_caps_the_output(tiny_tokenizer):
    model = build_varied_model(tiny_tokenizer, seed=0)
    gens = generate(model, tiny_tokenizer, [[Message("user", q)] for q in QUESTIONS], max_new_tokens=3, batch_size=2)
    assert all(g.completion_tokens <= 3 for g in gens)


def test_reference_loss_matches_transformers_loss(tiny_tokenizer):
    import torch

    model = build_varied_model(tiny_tokenizer, seed=1)
    examples = [chat(("user", q), ("assistant", a)) for q, a in (("card", "card_arrival"), (QUESTIONS[0], "Paris."))]
    res = reference_loss(model, tiny_tokenizer, examples, batch_size=2, precision="fp32")
    for ex, got in zip(examples, res.per_example):
        te = render_example(tiny_tokenizer, ex)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([te.input_ids]), labels=torch.tensor([te.labels])).loss.item()
        assert got == pytest.approx(want, rel=1e-4)
    assert res.tokens == sum(render_example(tiny_tokenizer, ex).n_trained for ex in examples)
    assert res.perplexity == pytest.approx(2.718281828 ** res.loss, rel=1e-6)


def test_shared_prefix_is_computed_once_and_gives_the_same_outputs(tiny_tokenizer):
    from tunesmith.evaluate.generate import MIN_SHARED_PREFIX, shared_prefix

    model = build_varied_model(tiny_tokenizer, seed=4)
    system = Message("system", "Answer with one of these labels: card_arrival, card_linking, exchange_rate, positive, negative.")
    prompts = [[system, Message("user", q)] for q in QUESTIONS]
    ids = [render_prompt(tiny_tokenizer, p) for p in prompts]
    assert len(shared_prefix(ids)) >= MIN_SHARED_PREFIX  # the system turn is shared
    gens = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, precision="fp32")
    for p, g in zip(ids, gens):
        expected = _hf_greedy(model, tiny_tokenizer, p, 6)
        assert g.text == tiny_tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert g.completion_tokens == len(expected)


def test_shared_prefix_leaves_every_prompt_a_token():
    from tunesmith.evaluate.generate import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert shared_prefix([[1, 2], [3, 4]]) == []
