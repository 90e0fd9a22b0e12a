"""The measured training speed behind validate's time estimate, and its cache."""

from __future__ import annotations

import json

from tunesmith.models.registry import resolve_model
from tunesmith.models.speed import SPEED_FILE, measure_train_tokens_per_s, speed_key


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
