"""The engine on the tiny model: training-identical prompts, batching without cross-talk,
stop handling, adapters added and removed at run time (generate_batch: test_engine_batch.py)."""

from __future__ import annotations

import threading

import pytest

from tunesmith.data.example import chat
from tunesmith.data.render import IGNORE_INDEX, render_example
from tunesmith.errors import UsageError
from tunesmith.generate.engine import AdapterConflictError, LocalEngine, SamplingParams, UnknownModelError
from tunesmith.models.inference import LoadedModel

from generate_helpers import wait_until_idle
from tiny_model import make_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def test_prompt_is_the_training_prefix(engine, tiny_tokenizer):
    turns = [("system", "Answer with the label."), ("user", "I am still waiting on my card?"),
             ("assistant", "card_arrival"), ("user", "How do I reset my password?"), ("assistant", "password")]
    trained = render_example(tiny_tokenizer, chat(*turns))
    prompt = engine.render_chat([{"role": r, "content": c} for r, c in turns[:-1]])
    # The served prompt is token for token what training saw before the last answer, and
    # the very next training token is the first trained (answer) token.
    assert trained.input_ids[: len(prompt)] == prompt
    assert trained.labels[len(prompt) - 1] == IGNORE_INDEX and trained.labels[len(prompt)] != IGNORE_INDEX
    assert prompt[-3:] == tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    bos = tiny_tokenizer.bos_token_id
    assert prompt.count(bos) == trained.input_ids[: len(prompt)].count(bos)


def test_batch_output_equals_alone_for_every_adapter(engine):
    prompts = {
        "short": engine.render_chat([{"role": "user", "content": "What is the capital of France?"}]),
        "long": engine.render_chat([{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]),
    }
    models = [engine.base_id, "alpha", "beta", "gamma"]
    alone = {(m, k): engine.generate(ids, m, GREEDY) for m in models for k, ids in prompts.items()}
    assert len({alone[(m, "short")][0] for m in models}) == 4, "adapters must change the output"

    together: dict = {}
    barrier = threading.Barrier(len(alone))

    def run(m: str, k: str) -> None:
        barrier.wait()
        together[(m, k)] = engine.generate(prompts[k], m, GREEDY)

    before = engine.stats()["peak_rows"]
    threads = [threading.Thread(target=run, args=key) for key in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert engine.stats()["peak_rows"] >= max(before, 2), "requests were not batched"


def test_newcomer_joins_a_running_batch(engine):
    """A request arriving mid-generation gets its tokens while a long one is still running."""
    import queue

    long_params = SamplingParams(max_tokens=300, temperature=0.0)
    # A random model may end its turn early; take a prompt that greedy runs to the full length.
    candidates = ["tell me a long story", "say more", "keep going", "list every number", "once upon a time"]
    long_ids = next(
        (ids for ids in (engine.render_chat([{"role": "user", "content": c}]) for c in candidates)
         if engine.generate(ids, "alpha", long_params)[1] == "length"),
        None,
    )
    assert long_ids is not None, "no candidate prompt keeps the tiny model generating for 300 tokens"
    events: queue.Queue = queue.Queue()
    handle = engine.submit(long_ids, "alpha", long_params, events.put)
    events.get()  # the long request is generating
    short = engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    text = engine.generate(short, "beta", GREEDY)
    long_events = []
    while not events.empty():
        long_events.append(events.get())
    assert long_events and not any(ev.finish_reason for ev in long_events), "the long one should still run"
    handle.cancel()
    assert wait_until_idle(engine)["running"] == 0
    assert text == engine.generate(short, "beta", GREEDY)


def test_stop_strings_and_length(engine):
    # A random model can emit partial UTF-8 (shown as U+FFFD); cut the stop string from a
    # stretch of whole characters, preceded by whole characters, so it is well defined.
    def clean_cut(text):
        for k in range(1, len(text) - 3):
            stop = text[k:k + 3]
            if "\ufffd" not in text[:k + 3] and text.find(stop) == k:
                return k, stop
        return None

    candidates = [(m, c) for m in ("alpha", "beta", "gamma")
                  for c in ("How do I reset my password?", "What is the capital of France?", "tell me a story")]
    for model, content in candidates:
        ids = engine.render_chat([{"role": "user", "content": content}])
        text, finish, n = engine.generate(ids, model, SamplingParams(max_tokens=12, temperature=0.0))
        if clean_cut(text):
            break
    assert clean_cut(text), f"no prompt gave a clean stretch of text: {text!r}"
    assert finish == "length" and n == 12
    k, stop = clean_cut(text)
    cut, finish, _ = engine.generate(ids, model, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
    assert (cut, finish) == (text[:k], "stop")


def test_end_of_turn_token_stops_generation(tiny_model_dir, tiny_tokenizer):
    """A model made to emit <|im_end|> first: finish_reason stop, the token not in the text."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is then the input embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
        emb[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] = 10 * emb[newline]
    eng = LocalEngine(LoadedModel(model, tiny_tokenizer, "eot", "eot"))
    try:
        ids = eng.render_chat([{"role": "user", "content": "hi"}])
        assert eng.generate(ids, "eot", GREEDY) == ("", "stop", 1)
    finally:
        eng.close()


def test_seeded_sampling_repeats(engine):
    ids = engine.render_chat([{"role": "user", "content": "hello"}])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = engine.generate(ids, "gamma", params)
    assert engine.generate(ids, "gamma", params) == first
    others = {engine.generate(ids, "gamma", SamplingParams(10, 1.0, 1.0, seed=s))[0] for s in range(4)}
    assert len(others) > 1


def test_add_and_remove_adapter_at_run_time(engine, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    make_adapter(tiny_model_dir, run_dir / "adapter", seed=11)
    ids = engine.render_chat([{"role": "user", "content": "hi"}])
    card = engine.add_adapter("delta", run_dir)  # a run directory resolves to its adapter/
    assert card.parent == engine.base_id and card.path.endswith("adapter")
    out = engine.generate(ids, "delta", GREEDY)
    with pytest.raises(AdapterConflictError):
        engine.add_adapter("delta", run_dir)
    engine.remove_adapter("delta")
    with pytest.raises(UnknownModelError):
        engine.submit(ids, "delta", GREEDY, lambda ev: None)
    assert "delta" not in [c.id for c in engine.models()]
    engine.add_adapter("delta", run_dir / "adapter")
    assert engine.generate(ids, "delta", GREEDY) == out
    engine.remove_adapter("delta")


def test_the_only_adapter_removed_and_added_back_answers_as_itself(tiny_model_dir, adapter_dirs):
    """With no other adapter left, peft's own note of the active adapter goes stale across a
    remove and an add; a request on the adapter alone (the engine's one-model fast path) must
    still run it, and answer as it does beside a base row (the per-row path)."""
    engine = LocalEngine.load(str(tiny_model_dir))
    try:
        ids = engine.render_chat([{"role": "user", "content": "hi"}])
        base = engine.generate(ids, engine.base_id, GREEDY)
        engine.add_adapter("solo", adapter_dirs["alpha"])
        alone = engine.generate(ids, "solo", GREEDY)
        assert alone != base
        engine.remove_adapter("solo")
        engine.add_adapter("solo", adapter_dirs["alpha"])
        assert engine.generate(ids, "solo", GREEDY) == alone
        assert engine.generate(ids, engine.base_id, GREEDY) == base
        texts = {engine.base_id: [], "solo": []}
        done = threading.Semaphore(0)

        def collect(model):
            def on_event(ev):
                texts[model].append(ev.text)
                if ev.finish_reason:
                    done.release()
            return on_event

        for model in texts:  # submitted together: usually one step holds both (peft's per-row path)
            engine.submit(ids, model, GREEDY, collect(model))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        assert "".join(texts[engine.base_id]) == base[0] and "".join(texts["solo"]) == alone[0]
    finally:
        engine.close()


def test_adapter_refusals(engine, tiny_model_dir, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=3, base_sha="f" * 64)
    with pytest.raises(UsageError, match="trained on base model 'other'"):
        engine.add_adapter("other", other)
    with pytest.raises(UsageError, match="does not exist"):
        engine.add_adapter("ghost", tmp_path / "nope")
    for bad_name in ("bad/name", "has space", "a~b", ""):  # "~" is how peft knows a ".": never a public name
        with pytest.raises(UsageError, match="not allowed"):
            engine.add_adapter(bad_name, other)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((other / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="only safetensors"):
        engine.add_adapter("pickled", pickled)
    assert {c.id for c in engine.models()} == {engine.base_id, "alpha", "beta", "gamma"}


def test_a_row_in_its_prefill_counts_as_running_and_a_cancel_is_counted_before_it_leaves(tiny_model_dir):
    """Between leaving the queue and joining the batch (its prefill, seconds for a long
    prompt) a row was in neither list, so stats read an idle engine: /health said so, and a
    test that waited for idle saw 1 of 2 cancellations (a flaky failure under CI load)."""
    import time

    engine = LocalEngine.load(str(tiny_model_dir))
    entered, release = threading.Event(), threading.Event()
    prefill = engine._prefill

    def held_prefill(new, prefix):
        entered.set()
        assert release.wait(30)
        prefill(new, prefix)

    engine._prefill = held_prefill
    try:
        ids = engine.render_chat([{"role": "user", "content": "hi"}])
        ended = threading.Event()
        engine.submit(ids, engine.base_id, GREEDY, lambda ev: ev.finish_reason and ended.set())
        assert entered.wait(30)
        stats = engine.stats()
        assert (stats["running"], stats["waiting"]) == (1, 0)  # held in its prefill: running, not gone
        release.set()
        assert ended.wait(30)
        assert wait_until_idle(engine)["running"] == 0

        # Cancelled after leaving the queue: once stats read idle, the cancellation is counted.
        entered.clear(), release.clear()
        handle = engine.submit(ids, engine.base_id, GREEDY, lambda ev: None)
        assert entered.wait(30)
        handle.cancel()
        assert engine.stats()["running"] == 1
        release.set()
        deadline = time.time() + 30
        while (stats := engine.stats())["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert stats["running"] == stats["waiting"] == 0 and stats["cancelled"] == 1
    finally:
        release.set()
        engine.close()
