"""The reference loss against transformers' own loss."""

from __future__ import annotations

import pytest

from tiny_model import build_varied_model
from tunesmith.data.example import chat
from tunesmith.data.render import render_example
from tunesmith.evaluate.loss import reference_loss


def test_reference_loss_matches_transformers_loss(tiny_tokenizer):
    import torch

    model = build_varied_model(tiny_tokenizer, seed=1)
    examples = [chat(("user", q), ("assistant", a)) for q, a in (("card", "card_arrival"),
                                                                 ("What is the capital of France?", "Paris."))]
    res = reference_loss(model, tiny_tokenizer, examples, batch_size=2, precision="fp32")
    for ex, got in zip(examples, res.per_example):
        te = render_example(tiny_tokenizer, ex)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([te.input_ids]), labels=torch.tensor([te.labels])).loss.item()
        assert got == pytest.approx(want, rel=1e-4)
    assert res.tokens == sum(render_example(tiny_tokenizer, ex).n_trained for ex in examples)
    assert res.perplexity == pytest.approx(2.718281828 ** res.loss, rel=1e-6)
