"""Eval's prediction for a prompt is what the server's engine answers at temperature 0:
both load through models.inference and generate through the one engine at the same default
precision, free text and held to a JSON schema or a choice alike, whatever rows eval batches together."""

from __future__ import annotations

import pytest

from eval_helpers import make_adapter
from tunesmith.data.example import chat, split_example
from tunesmith.evaluate.evaluation import evaluate_loaded
from tunesmith.generate.constraints import Constraint
from tunesmith.generate.engine import LocalEngine, SamplingParams
from tunesmith.models.inference import load_for_inference

QUESTIONS = ["What is the capital of France?", "card", "How do I reset my password? Please click on forgot password.",
             "The quick brown fox jumps over the lazy dog.", "I am still waiting on my card?"]
SYSTEM = "Answer with one of these labels: card_arrival, card_linking, exchange_rate, positive, negative."
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["card_arrival", "exchange_rate"]}}, "required": ["label"]}


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("constraint", [None, Constraint.json_schema(SCHEMA),
                                        Constraint.choice(["card_arrival", "exchange_rate", "positive"])])
def test_eval_predictions_equal_the_served_answers(tiny_model_dir, tmp_path, constraint, merge):
    # merged: as `tunesmith eval` loads an adapter (folded into the base's weights), while
    # serve keeps it as a LoRA layer beside others.
    adapter = make_adapter(tiny_model_dir, tmp_path / "tuned", seed=3)
    examples = [chat(("system", SYSTEM), ("user", q), ("assistant", "card_arrival")) for q in QUESTIONS]
    loaded = load_for_inference(tiny_model_dir, adapter, merge=merge)
    assert loaded.merged is merge and hasattr(loaded.model, "peft_config") is (not merge)
    result = evaluate_loaded(loaded, examples, max_new_tokens=12, batch_size=2,
                             with_loss=merge, constraint=constraint, log=lambda _: None)
    predictions = [row["prediction"] for row in result.predictions]
    # Free text varies with the question; held to 3 labels or one enum, all 5 may agree
    # (which they do for some adapters: the test's adapter depends on torch's RNG state).
    assert len(set(predictions)) > 1 or constraint is not None

    # As `tunesmith serve --adapter tuned=...` loads it; one request at a time.
    engine = LocalEngine.load(str(tiny_model_dir), [("tuned", adapter)])
    try:
        for ex, predicted in zip(examples, predictions):
            prompt = engine.render_chat([m.to_template() for m in split_example(ex)[0]])
            text, _, _ = engine.generate(prompt, "tuned", SamplingParams(12, 0.0, constraint=constraint))
            assert predicted == text.strip()
    finally:
        engine.close()
    if merge:  # the reference loss too, against the unmerged adapter's
        unmerged = evaluate_loaded(load_for_inference(tiny_model_dir, adapter), examples, max_new_tokens=1,
                                   batch_size=2, with_loss=True, constraint=constraint, log=lambda _: None)
        assert result.metrics["loss"] == pytest.approx(unmerged.metrics["loss"], rel=1e-4)
