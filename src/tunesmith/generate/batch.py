"""The running batch's KV cache and attention mask, as the engine reshapes them between
steps: rows left-padded into one batch, two batches joined, finished rows dropped, new rows
started from a copy of a shared prefix's cache.

Every row's newest token sits in the last column; padding is masked out wherever it is
(on the left, or between a shared prefix and a row's own tokens), and position ids count
real tokens only, so a row's outputs do not depend on what it is batched with.

    python -c "from tunesmith.generate.batch import shared_prefix; print(shared_prefix([[1, 2, 3], [1, 2, 4]]))"
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

MIN_SHARED_PREFIX = 32
"""Prompts sharing at least this many leading tokens (a long system prompt, a label list,
fixed few-shot examples) compute them once and start from copies of their KV cache."""


def shared_prefix(prompt_ids: Sequence[Sequence[int]]) -> list[int]:
    """The leading tokens every prompt has, leaving each at least one token of its own."""
    first = prompt_ids[0]
    n = min(len(p) for p in prompt_ids) - 1
    for p in prompt_ids[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return list(first[:max(n, 0)])


def left_padded(rows: Sequence[Sequence[int]], pad: int, offset: int, device: Any) -> tuple[Any, Any, Any]:
    """(input ids, attention mask, position ids) of rows left-padded to one width; positions
    start at `offset` (the tokens already in the cache before them)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
    return ids.to(device), mask.to(device), positions.to(device)


def repeat_prefix(prefix_cache: Any, rows: int) -> Any:
    """A fresh cache holding the prefix once per row (the prefix's own cache is kept as is)."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(rows)
    return cache


def join(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> Any:
    """Append the rows of (new_cache, new_mask) to (cache, mask), left-padding the shorter
    side; `cache` is updated in place, the joined mask returned."""
    import torch
    import torch.nn.functional as F

    old_len, new_len = mask.shape[1], new_mask.shape[1]
    width = max(old_len, new_len)
    for mine, theirs in zip(cache.layers, new_cache.layers):
        for attr in ("keys", "values"):
            a, b = getattr(mine, attr), getattr(theirs, attr)
            a = F.pad(a, (0, 0, width - old_len, 0))
            b = F.pad(b, (0, 0, width - new_len, 0))
            setattr(mine, attr, torch.cat([a, b], dim=0))
    return torch.cat([F.pad(mask, (width - old_len, 0)), F.pad(new_mask, (width - new_len, 0))])


def keep_rows(cache: Any, mask: Any, keep: Any) -> Any:
    """Keep only the rows at index tensor `keep` and trim the columns that are padding in
    every row left; `cache` is updated in place, the new mask returned."""
    cache.batch_select_indices(keep)
    mask = mask[keep]
    first = int((mask.sum(0) > 0).nonzero()[0])
    if first:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        mask = mask[:, first:]
    return mask
