"""Loss on reference answers, on exactly the tokens training computes loss on: the number
`tunesmith eval` reports as loss and perplexity next to its scores.

    python -c "from tunesmith.evaluate.loss import reference_loss; help(reference_loss)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from tunesmith.data.example import Example
from tunesmith.data.render import IGNORE_INDEX, render_examples
from tunesmith.models.inference import autocast, causal_lm, pad_id


@dataclass
class LossResult:
    loss: float
    """Mean cross-entropy per trained token over the whole set."""
    perplexity: float
    tokens: int
    per_example: list[float]
    """Mean loss per trained token of each example (nan when it has none)."""


def reference_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int = 16,
    precision: str = "auto",
    max_seq_len: int | None = 2048,
) -> LossResult:
    """Loss on the reference answers, on exactly the tokens training computes loss on."""
    import torch
    import torch.nn.functional as F

    rendered = render_examples(tokenizer, examples, max_seq_len)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    sums = [0.0] * len(rendered)
    counts = [0] * len(rendered)
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    with torch.inference_mode(), autocast(precision, device.type):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(rendered[i]) for i in rows)
            ids = torch.tensor([rendered[i].input_ids + [pad] * (width - len(rendered[i])) for i in rows], device=device)
            labels = torch.tensor(
                [rendered[i].labels + [IGNORE_INDEX] * (width - len(rendered[i])) for i in rows], device=device
            )
            mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(rendered[i]) for i in rows], device=device)[:, None]).long()
            # As training does (train.model.forward_loss): the LM head only where a label is,
            # not over the whole vocabulary at every prompt and padding position.
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            trained = targets != IGNORE_INDEX
            tok_loss = F.cross_entropy(lm.get_output_embeddings()(hidden[trained]).float(), targets[trained],
                                       reduction="none")
            row_of = torch.arange(len(rows), device=device)[:, None].expand_as(targets)[trained]
            row_sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, tok_loss.double())
            row_counts = trained.sum(dim=1)
            for r, i in enumerate(rows):
                sums[i] = float(row_sums[r])
                counts[i] = int(row_counts[r])
    total = sum(counts)
    loss = sum(sums) / total if total else float("nan")
    return LossResult(
        loss=loss,
        perplexity=math.exp(loss) if total and loss < 50 else float("nan"),
        tokens=total,
        per_example=[s / c if c else float("nan") for s, c in zip(sums, counts)],
    )
