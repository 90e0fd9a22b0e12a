"""The measured training speed behind validate's time estimate, and its cache."""

from __future__ import annotations

import json

from tunesmith.models.registry import resolve_model
from tunesmith.models.speed import SPEED_FILE, speed_key
from tunesmith.train.speed import measure_train_tokens_per_s


def test_measure_and_cache(tiny_model_dir, _isolated_home):
    ref = resolve_model(str(tiny_model_dir))
    first = measure_train_tokens_per_s(ref, seq_len=32, steps=1)
    assert first > 0
    cache = json.loads((_isolated_home / SPEED_FILE).read_text())
    key = speed_key(ref, 32, 1)
    assert key in cache and cache[key]["tokens_per_s"] == first
    assert cache[key]["precision"] in ("bf16", "fp32")
    # A second call is answered from the cache (same float, no new entry) unless it was
    # measured on a busy machine that is idle now.
    if not cache[key]["busy"]:
        assert measure_train_tokens_per_s(ref, seq_len=32, steps=1) == first
    # Another shape is another entry.
    measure_train_tokens_per_s(ref, seq_len=16, steps=1)
    assert len(json.loads((_isolated_home / SPEED_FILE).read_text())) == 2


def test_probe_shape_follows_the_data():
    from tunesmith.data.validate import PROBE_TOKENS, probe_shape

    # banking77: ~50-token examples, so 64-token probes, a full default batch of 16.
    assert probe_shape({"tokens_per_example": {"p50": 50}, "max_seq_len": 2048}) == (64, 16)
    assert probe_shape({"tokens_per_example": {"p50": 64}, "max_seq_len": 2048}) == (64, 16)
    # Longer examples: fewer of them per probe step, never fewer than one.
    assert probe_shape({"tokens_per_example": {"p50": 300}, "max_seq_len": 2048}) == (512, PROBE_TOKENS // 512)
    assert probe_shape({"tokens_per_example": {"p50": 5000}, "max_seq_len": 2048}) == (2048, 1)
    # Never longer than training would cut examples to, never shorter than 32.
    assert probe_shape({"tokens_per_example": {"p50": 900}, "max_seq_len": 256}) == (256, PROBE_TOKENS // 256)
    assert probe_shape({"tokens_per_example": {"p50": 3}, "max_seq_len": 2048})[0] == 32
