"""Before evaluate/generate.py's decode loop goes: the engine's greedy batch (generate_batch at
temperature 0) answers exactly what that loop answered, in fp32, on the tiny model: prompts
of varied lengths, with and without a shared prefix, with an adapter, with a JSON schema."""

from __future__ import annotations

import pytest

from eval_helpers import build_varied_model, make_adapter
from tunesmith.data.example import Message
from tunesmith.data.render import render_prompt
from tunesmith.evaluate.generate import generate_ids
from tunesmith.generate.batch import MIN_SHARED_PREFIX, shared_prefix
from tunesmith.generate.engine import LocalEngine, SamplingParams
from tunesmith.models.inference import LoadedModel, load_for_inference

QUESTIONS = [
    "What is the capital of France?",
    "card",
    "How do I reset my password? Please click on forgot password.",
    "json true",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "I am still waiting on my card?",
    "positive negative neutral",
]
SYSTEM = "Answer with one of these labels: card_arrival, card_linking, exchange_rate, positive, negative."
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["card_arrival", "exchange_rate"]},
                                           "sure": {"type": "boolean"}}, "required": ["label", "sure"]}


def _both(loaded, prompts, max_new_tokens, rows, schema=None):
    ids = [render_prompt(loaded.tokenizer, p) for p in prompts]
    old = generate_ids(loaded.model, loaded.tokenizer, ids, max_new_tokens, rows, "fp32", json_schema=schema)
    engine = LocalEngine(loaded, precision="fp32", max_batch_rows=rows)
    try:
        new = engine.generate_batch(ids, loaded.model_id, SamplingParams(max_new_tokens, 0.0, json_schema=schema))
    finally:
        engine.close()
    return ids, old, new


def _same(old, new):
    assert [g.text for g in old] == [c.text.strip() for c in new]
    # The engine counts the end-of-turn token it generated (as OpenAI's usage does); the old
    # loop did not.
    assert [g.completion_tokens + (c.finish_reason == "stop") for g, c in zip(old, new)] == \
        [c.completion_tokens for c in new]
    assert [g.prompt_tokens for g in old] == [c.prompt_tokens for c in new]


@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("with_system", [False, True])
def test_varied_lengths_with_and_without_a_shared_prefix(tiny_tokenizer, rows, with_system):
    model = build_varied_model(tiny_tokenizer, seed=4)
    loaded = LoadedModel(model, tiny_tokenizer, "tiny", "tiny")
    # Without: each prompt its own system turn (the template's default one would be shared).
    prompts = [[Message("system", SYSTEM if with_system else q), Message("user", q)] for q in QUESTIONS]
    ids, old, new = _both(loaded, prompts, 8, rows)
    assert len({len(i) for i in ids}) > 1
    assert (len(shared_prefix(ids)) >= MIN_SHARED_PREFIX) == with_system
    assert len({g.text for g in old}) > 1
    _same(old, new)


def test_with_an_adapter(tiny_model_dir, tiny_tokenizer, tmp_path):
    loaded = load_for_inference(tiny_model_dir, make_adapter(tiny_model_dir, tmp_path / "a", seed=3))
    prompts = [[Message("system", SYSTEM), Message("user", q)] for q in QUESTIONS]
    _, old, new = _both(loaded, prompts, 8, 3)
    assert len({g.text for g in old}) > 1
    _same(old, new)


def test_with_a_json_schema(tiny_model_dir, tiny_tokenizer, tmp_path):
    loaded = load_for_inference(tiny_model_dir, make_adapter(tiny_model_dir, tmp_path / "a", seed=5))
    prompts = [[Message("user", q)] for q in QUESTIONS]
    _, old, new = _both(loaded, prompts, 24, 4, SCHEMA)
    assert any(g.text.startswith("{") for g in old)
    _same(old, new)


def test_rows_that_end_their_turn_at_different_steps(tiny_tokenizer):
    import torch
    from collections import Counter

    from tunesmith.data.render import end_of_turn_ids

    model = build_varied_model(tiny_tokenizer, seed=2, tied=False)
    loaded = LoadedModel(model, tiny_tokenizer, "tiny", "tiny")
    prompts = [[Message("system", SYSTEM), Message("user", q)] for q in QUESTIONS]
    ids = [render_prompt(tiny_tokenizer, p) for p in prompts]
    with torch.no_grad():
        greedy = [model.generate(torch.tensor([i]), max_new_tokens=12, do_sample=False)[0, len(i):].tolist()
                  for i in ids]
    # Make the token most rows generate the end of turn: rows now stop at different steps.
    common = Counter(t for g in greedy for t in set(g[1:])).most_common(1)[0][0]
    (stop,) = end_of_turn_ids(tiny_tokenizer)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[common, stop]] = w[[stop, common]]
    _, old, new = _both(loaded, prompts, 12, 3)
    finishes = [c.finish_reason for c in new]
    print("finish reasons:", finishes, "completion tokens:", [c.completion_tokens for c in new])
    assert "stop" in finishes and len({c.completion_tokens for c in new}) > 1
    _same(old, new)
