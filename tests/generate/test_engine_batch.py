"""The engine's blocking batch (`generate_batch`, eval's greedy batch at temperature 0)
against transformers' own greedy generate: rows of varied lengths decoded together, a
shared prefix prefilled once, the end-of-turn stop, max_tokens, results in the caller's order."""

from __future__ import annotations

import pytest

from tiny_model import build_varied_model
from tunesmith.data.example import Message
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.generate.batch import MIN_SHARED_PREFIX, shared_prefix
from tunesmith.generate.engine import LocalEngine, SamplingParams
from tunesmith.models.inference import LoadedModel

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


def _batch(model, tokenizer, ids, max_tokens, rows, on_done=None):
    engine = LocalEngine(LoadedModel(model, tokenizer, "tiny", "tiny"), precision="fp32", max_batch_rows=rows)
    try:
        return engine.generate_batch(ids, "tiny", SamplingParams(max_tokens, 0.0), on_done)
    finally:
        engine.close()


@pytest.mark.parametrize("rows", [2, 5])
def test_batched_left_padded_generation_equals_one_row_at_a_time(tiny_tokenizer, rows):
    model = build_varied_model(tiny_tokenizer, seed=0)
    ids = [render_prompt(tiny_tokenizer, [Message("user", q)]) for q in QUESTIONS]
    assert len({len(i) for i in ids}) > 1  # different lengths, so the batch is padded
    done = []
    batched = _batch(model, tiny_tokenizer, ids, 8, rows, done.append)
    assert sorted(done) == list(range(len(ids)))
    for p, g in zip(ids, batched):
        expected = _hf_greedy(model, tiny_tokenizer, p, 8)
        stopped = len(expected) < 8
        assert g.completion_tokens == len(expected) + stopped  # the end-of-turn token counts, as in usage
        assert g.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
        assert g.prompt_tokens == len(p)
        assert g.latency_s > 0
        assert g.finish_reason == ("stop" if stopped else "length")
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
    (g,) = _batch(model, tiny_tokenizer, [ids], 10, 4)
    assert (g.completion_tokens, g.finish_reason) == (2, "stop")  # the first token and the end of turn
    assert g.text == tiny_tokenizer.decode([first], skip_special_tokens=True)


def test_shared_prefix_is_computed_once_and_gives_the_same_outputs(tiny_tokenizer):
    model = build_varied_model(tiny_tokenizer, seed=4)
    system = Message("system", "Answer with one of these labels: card_arrival, card_linking, exchange_rate, positive, negative.")
    ids = [render_prompt(tiny_tokenizer, [system, Message("user", q)]) for q in QUESTIONS]
    assert len(shared_prefix(ids)) >= MIN_SHARED_PREFIX  # the system turn is shared
    for rows in (2, 5):
        gens = _batch(model, tiny_tokenizer, ids, 6, rows)
        for p, g in zip(ids, gens):
            expected = _hf_greedy(model, tiny_tokenizer, p, 6)
            assert g.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]
    assert shared_prefix([[1, 2], [3, 4]]) == []


def test_a_group_of_answers_to_one_prompt_prefills_it_once_and_samples_each_row_with_its_seed(tiny_tokenizer):
    # Reinforcement samples --group-size answers to each prompt: the prompt's forward is
    # computed once per group, and every answer is still the one its seed gives alone.
    model = build_varied_model(tiny_tokenizer, seed=5)
    a, b = (render_prompt(tiny_tokenizer, [Message("user", q)]) for q in QUESTIONS[2:4])
    ids, seeds = [a, a, a, b, b, b], [11, 12, 13, 21, 22, 23]
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: embedded.append(tuple(args[0].shape)))
    engine = LocalEngine(LoadedModel(model, tiny_tokenizer, "tiny", "tiny"), precision="fp32", max_batch_rows=6)
    params = SamplingParams(5, 1.0)
    try:
        grouped = engine.generate_batch(ids, "tiny", params, seeds=seeds)
        prefill_rows = [rows for rows, width in embedded if width > 1]  # decode steps embed one token a row
        alone = [engine.generate_batch([p], "tiny", params, seeds=[s])[0] for p, s in zip(ids, seeds)]
    finally:
        hook.remove()
        engine.close()
    assert len(shared_prefix(ids)) >= MIN_SHARED_PREFIX  # the template's system turn, computed once
    assert prefill_rows == [1, 2]  # the shared prefix, then the two prompts' own tokens: not six rows
    assert [g.token_ids for g in grouped] == [g.token_ids for g in alone]
    assert [g.text for g in grouped] == [g.text for g in alone]
    assert len({g.token_ids for g in grouped[:3]}) > 1  # the group's answers differ: each row its own seed
