"""Training data: read, render with the chat template, drop what cannot train, batch.

The order of examples is a pure function of (seed, epoch), so a resumed run finds its
place from the step number alone, and every process of a multi-process run knows every
batch (it trains its share and knows the step's total trained tokens without talking).

    python -c "from tunesmith.train.data import plan_step; help(plan_step)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tunesmith.data.example import Example
from tunesmith.data.formats import ColumnMapping, read_data
from tunesmith.data.render import IGNORE_INDEX, TokenizedExample, render_examples
from tunesmith.errors import DataError, UsageError

MAX_DROPPED_SHARE = 0.10
"""Refuse to train when more than this share of examples would lose every trained token."""


@dataclass
class DataStats:
    examples: int = 0
    dropped_no_trained_tokens: int = 0
    truncated: int = 0
    answer_truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_examples(path: Path, fmt: str | None, columns: ColumnMapping) -> list[Example]:
    """Supervised examples from a file; every problem in it is one DataError."""
    result = read_data(path, fmt, columns)
    if result.preferences and not result.examples:
        raise UsageError(f"'{path}' holds preference pairs (prompt with a chosen and a rejected answer), which "
                         "supervised training cannot use; train on them with --method dpo")
    raise_for_errors(path, result.errors)
    if not any(ex.trained_messages for ex in result.examples):
        raise DataError(f"{path}: no example has an assistant answer to learn; for CSV give --output-column")
    return result.examples


def raise_for_errors(path: Path, errors: Sequence[Any]) -> None:
    """One DataError naming the first problems of a file, if it has any."""
    if errors:
        shown = "; ".join(f"line {p.line} {p.field}: {p.message}".replace(" :", ":") for p in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(
            f"{path}: {len(errors)} problem(s): {shown}{more}; run `tunesmith validate {path}` to see them all"
        )


def render_and_filter(tokenizer: Any, examples: Sequence[Example], max_seq_len: int, where: str) -> tuple[list[TokenizedExample], DataStats]:
    """Render, truncate (keep the first max_seq_len tokens), drop examples with no trained token.

    Raises DataError when more than MAX_DROPPED_SHARE of the examples would be dropped.
    """
    rendered = render_examples(tokenizer, examples, max_seq_len)
    kept = [t for t in rendered if t.n_trained > 0]
    stats = DataStats(
        examples=len(kept),
        dropped_no_trained_tokens=len(rendered) - len(kept),
        truncated=sum(t.truncated for t in rendered),
        answer_truncated=sum(t.assistant_truncated for t in rendered),
        tokens=sum(len(t) for t in kept),
        trained_tokens=sum(t.n_trained for t in kept),
        longest=max((t.full_length for t in rendered), default=0),
    )
    check_kept(stats, len(rendered), max_seq_len, where)
    return kept, stats


def check_kept(stats: DataStats, n_rendered: int, max_seq_len: int, where: str, unit: str = "examples") -> None:
    """Refuse data that lost too many items to truncation, or all of them."""
    if n_rendered and stats.dropped_no_trained_tokens > MAX_DROPPED_SHARE * n_rendered:
        raise DataError(
            f"{where}: {stats.dropped_no_trained_tokens} of {n_rendered} {unit} would have no token to "
            f"train on (answers beyond --max-seq-len {max_seq_len}, the longest example has {stats.longest} "
            f"tokens); raise --max-seq-len or shorten the prompts (at most {MAX_DROPPED_SHARE:.0%} may be dropped)"
        )
    if not stats.examples:
        raise DataError(f"{where}: none of the {unit} is left to train on")


def split_validation(examples: list[TokenizedExample], share: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random share (at least one example) for validation."""
    import torch

    if share <= 0 or len(examples) < 2:
        return examples, []
    n_valid = max(1, round(len(examples) * share))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    import torch

    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def plan_step(n_examples: int, batch_size: int, seed: int, step: int) -> tuple[int, list[int]]:
    """(epoch, example indices) of optimizer step `step` (0-based) over all processes."""
    spe = steps_per_epoch(n_examples, batch_size)
    epoch, within = divmod(step, spe)
    order = epoch_order(n_examples, seed, epoch)
    return epoch, order[within * batch_size : (within + 1) * batch_size]


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This process's share of a step's examples."""
    return indices[rank::world_size]


def micro_batches(indices: list[int], micro_batch_size: int | None) -> list[list[int]]:
    size = micro_batch_size or max(1, len(indices))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


MIN_SHARED_PREFIX = 4
"""A common prefix shorter than this is not worth the bookkeeping (collate's share_prefix)."""


def shared_prefix_len(examples: Sequence[TokenizedExample]) -> int:
    """How many leading tokens every example has in common and computes alike: the longest
    common prefix of their ids, cut where any example has a target (label) in it, and at
    least one token short of the shortest example. 0 when below MIN_SHARED_PREFIX or for a
    single example. Typically the chat template's system prompt and the user turn's header."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(t) for t in examples) - 1
    for t in examples[1:]:
        ids = t.input_ids
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    for t in examples:
        # target at position p is labels[p + 1]: the prefix's positions carry none.
        k = 0
        while k < n and t.labels[k + 1] == IGNORE_INDEX:
            k += 1
        n = k
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(examples: Sequence[TokenizedExample], packing: bool, pad_id: int, share_prefix: bool = False) -> dict[str, Any]:
    """Tensors for one forward pass. Targets are the labels shifted within each example,
    so no example ever predicts the first token of the next one.

    packing: one row [1, total] with per-example position ids, `cu_seq_lens` (cumulative
    lengths) and the gather indices the packed attention uses to keep examples apart.
    Otherwise: right-padded rows with an attention mask.

    share_prefix (packing only): the examples' common untrained prefix (shared_prefix_len)
    is in the row once, and every example's attention reads it as its own beginning (its
    pack_index row starts with the prefix's positions). The result equals computing it per
    example: the prefix's hidden states are the same in every example, and gradients from
    all of them add up through the one copy; the linear layers, where the FLOPs are, run on
    fewer tokens. `tokens` still counts every example's whole length (the data trained on);
    `computed_tokens` is the row's length.
    """
    import torch

    shifted = [t.labels[1:] + [IGNORE_INDEX] for t in examples]
    if packing:
        shared = shared_prefix_len(examples) if share_prefix else 0
        own = [t.input_ids[shared:] for t in examples]
        ids = list(examples[0].input_ids[:shared]) + [i for o in own for i in o]
        pos = list(range(shared)) + [p for t in examples for p in range(shared, len(t))]
        targets = list(shifted[0][:shared]) + [x for s in shifted for x in s[shared:]]
        cu = [shared]
        for o in own:
            cu.append(cu[-1] + len(o))
        longest = max(len(t) for t in examples)
        # pack_index[e, j]: position in the row of token j of example e (0 past its end);
        # unpack_index[p]: where row position p sits in the [examples * longest] layout
        # (the shared prefix's outputs are taken from the first example's copy).
        pack_index = torch.zeros((len(examples), longest), dtype=torch.long)
        unpack_index = torch.empty(len(ids), dtype=torch.long)
        unpack_index[:shared] = torch.arange(shared)
        for e, t in enumerate(examples):
            pack_index[e, :shared] = torch.arange(shared)
            pack_index[e, shared : len(t)] = torch.arange(cu[e], cu[e + 1])
            unpack_index[cu[e] : cu[e + 1]] = torch.arange(e * longest + shared, e * longest + len(t))
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "cu_seq_lens": torch.tensor(cu),
            "pack_index": pack_index,
            "unpack_index": unpack_index,
            "targets": torch.tensor([targets]),
            "tokens": sum(len(t) for t in examples),
            "computed_tokens": len(ids),
            "shared_prefix": shared,
        }
    width = max(len(t) for t in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX)
    for row, (t, s) in enumerate(zip(examples, shifted)):
        ids[row, : len(t)] = torch.tensor(t.input_ids)
        mask[row, : len(t)] = 1
        targets[row, : len(t)] = torch.tensor(s)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "tokens": int(mask.sum())}


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A collated batch with its tensors on `device` (counts and other plain values as they are)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def trained_tokens(examples: Sequence[TokenizedExample]) -> int:
    """Positions that carry a loss (after the shift; the first token is never a target)."""
    return sum(sum(1 for x in t.labels[1:] if x != IGNORE_INDEX) for t in examples)
