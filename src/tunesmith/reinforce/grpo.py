"""GRPO's pieces: answers as training sequences, group-normalised advantages, the token loss.

For a prompt, G answers are sampled from the policy (the base plus the adapter being
trained) and scored by the grader. Each answer's advantage is its reward against its group:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)          (std over the group, population)

and every token t of answer i is weighted by it (Shao et al., 2024, GRPO):

    ratio_t = pi(t) / pi_old(t)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i) + kl_coef * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (k3, always >= 0)

The step's loss is the sum of loss_t over every answer token of the step divided by the
number of those tokens (token-level, as DAPO, Yu et al., 2025), not each answer's mean
averaged over answers (the GRPO paper). Why, in docs/rft.md: every token counts the same,
so a long wrong answer is not pushed down less per token than a short one, and it is the
normalisation tunesmith's supervised loss already uses (sum over the step's trained tokens
/ their count, whatever the micro-batching).

`pi_old` is the policy that sampled the answers: with one update per sampled batch
(--policy-updates 1) it is the policy being trained, the ratio is exactly 1 and its
gradient is the plain policy gradient. `ref` is the policy as training started: the
--init-adapter (frozen) when given, else the base with the adapter disabled (reinforce/run.py).

    python -c "from tunesmith.reinforce.grpo import group_advantages; print(group_advantages([1, 0, 0, 1], 2))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunesmith.data.render import IGNORE_INDEX, TokenizedExample
from tunesmith.train import data as td
from tunesmith.train.preference import token_logps

ADVANTAGE_EPS = 1e-4


@dataclass
class Sample:
    """One sampled answer to one prompt, graded."""

    prompt: int
    """Index of the prompt in the training prompts."""
    line: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    reward: float = 0.0
    errors: dict[str, Any] = field(default_factory=dict)
    advantage: float = 0.0

    def sequence(self) -> TokenizedExample:
        """Prompt and answer as one training sequence: only the answer's tokens are labelled
        (the end-of-turn token too, when the answer ended with it)."""
        return TokenizedExample(self.prompt_ids + self.completion_ids,
                                [IGNORE_INDEX] * len(self.prompt_ids) + self.completion_ids)


def group_advantages(rewards: Sequence[float], group_size: int) -> tuple[list[float], float]:
    """Each reward against its group (consecutive runs of `group_size`), and the share of
    groups whose rewards are all equal (their advantages are 0: they teach nothing)."""
    advantages, flat = [], 0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        flat += max(group) == min(group)
        advantages += [0.0 if max(group) == min(group) else (r - mean) / (std + ADVANTAGE_EPS) for r in group]
    return advantages, flat / max(1, math.ceil(len(rewards) / group_size))


def collate_samples(samples: Sequence[Sample], packing: bool, pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """One forward pass over the answers (prompt + answer each), laid out as SFT examples
    (train.data.collate; packed, the answers' common beginning is computed once), plus
    `sequence`: the answer each position belongs to, and `advantages` per answer."""
    import torch

    seqs = [s.sequence() for s in samples]
    batch = td.collate(seqs, packing, pad_id, share_prefix=packing)
    if packing:
        # The shared prefix is in the row once (it carries no label: any answer index will do).
        shared = batch["shared_prefix"]
        own = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(s) - shared for s in seqs]))
        batch["sequence"] = torch.cat([torch.zeros(shared, dtype=torch.long), own]).unsqueeze(0)
    else:
        batch["sequence"] = torch.arange(len(seqs)).unsqueeze(1).expand_as(batch["targets"])
    batch["advantages"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    batch["n_sequences"] = len(seqs)
    return td.to_device(batch, device)


def policy_logps(model: Any, batch: dict[str, Any], compute_dtype: Any) -> Any:
    """The log-prob of every answer token under `model` as it is now: [answer tokens] fp32."""
    return token_logps(model, batch, compute_dtype)[0]


def grpo_token_loss(logps: Any, batch: dict[str, Any], old_logps: Any | None, ref_logps: Any | None,
                    clip_epsilon: float, kl_coef: float) -> tuple[Any, Any]:
    """(per-token loss [answer tokens], per-token KL or None) as the module docstring writes them.

    old_logps None: the sampling policy is this one (ratio 1, the gradient still flows
    through logps). ref_logps None: no KL term."""
    import torch

    keep = batch["targets"] != IGNORE_INDEX
    advantages = batch["advantages"][batch["sequence"][keep]]
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1.0
        if kl_coef:
            loss = loss + kl_coef * kl
    return loss, kl
