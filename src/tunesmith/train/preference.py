"""Preference tuning (DPO): pairs rendered like SFT examples, per-sequence log-probs, the loss.

    tunesmith train --method dpo --data examples/preference.jsonl --max-steps 20 --out runs/dpo

A pair is two sequences, the prompt followed by the chosen answer and by the rejected one,
rendered by the same code as supervised examples (`data.render`): prompt tokens carry no
label, the answer and its end-of-turn token do. The loss of a pair is DPO's sigmoid loss
(Rafailov et al., 2023):

    reward(answer) = beta * (log pi(answer | prompt) - log ref(answer | prompt))
    loss           = -log sigmoid(reward(chosen) - reward(rejected))

where log pi is the sum over the answer's labelled tokens under the policy (the base model
plus the LoRA adapter being trained) and log ref the same under the reference model.

The reference is the policy before the first step: the base model with the adapter
disabled (`model.disable_adapter()`), or the `--init-adapter` (an SFT run) the policy
starts from. Its log-probs depend only on the data, so they are computed once, before the
first step, by the same model (no second copy of the weights), stored in the run
directory for `--resume`, and a step then costs one forward and backward like an SFT step.

    python -c "from tunesmith.train.preference import dpo_loss; help(dpo_loss)"
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith.data.example import PreferenceExample
from tunesmith.data.formats import read_data
from tunesmith.data.render import IGNORE_INDEX, TokenizedExample, render_examples
from tunesmith.errors import UsageError
from tunesmith.models.inference import causal_lm
from tunesmith.train import data as td

REFERENCE_FILE = "reference_logps.safetensors"
"""OUT/reference_logps.safetensors: the reference log-probs of every train and validation pair."""
REWARD_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
VALID_KEYS = ("valid_reward_accuracy", "valid_reward_margin")


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as the model sees it, with the reference's log-probs once known."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    line: int = 0
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


# ----------------------------------------------------------------------------- data


def load_pairs(path: Path, fmt: str | None) -> list[PreferenceExample]:
    """Preference pairs from a file; a supervised file is refused with what to do instead."""
    result = read_data(path, fmt)
    if result.examples and not result.preferences:
        raise UsageError(
            f"'{path}' holds supervised examples ({result.format} format), not preference pairs: --method dpo "
            "trains on lines with prompt/chosen/rejected (or input/preferred_output/non_preferred_output); "
            "train this file with --method lora"
        )
    td.raise_for_errors(path, result.errors)
    return result.preferences


def render_pairs(tokenizer: Any, prefs: Sequence[PreferenceExample], max_seq_len: int,
                 where: str) -> tuple[list[TokenizedPair], td.DataStats]:
    """Render both sequences of every pair (one batched tokenizer call) with the SFT rules:
    each keeps its first max_seq_len tokens; a pair is dropped when either answer is left
    with no trained token. Stats count pairs, and tokens of both sequences."""
    sequences = [s for p in prefs for s in p.sequences()]
    rendered = render_examples(tokenizer, sequences, max_seq_len)
    both = list(zip(prefs, rendered[0::2], rendered[1::2]))
    pairs = [TokenizedPair(c, r, p.line) for p, c, r in both if c.n_trained and r.n_trained]
    stats = td.DataStats(
        examples=len(pairs),
        dropped_no_trained_tokens=len(prefs) - len(pairs),
        truncated=sum(c.truncated or r.truncated for _, c, r in both),
        answer_truncated=sum(c.assistant_truncated or r.assistant_truncated for _, c, r in both),
        tokens=sum(len(p) for p in pairs),
        trained_tokens=sum(p.chosen.n_trained + p.rejected.n_trained for p in pairs),
        longest=max((t.full_length for t in rendered), default=0),
    )
    td.check_kept(stats, len(prefs), max_seq_len, where, unit="preference pairs")
    return pairs, stats


def collate_pairs(pairs: Sequence[TokenizedPair], packing: bool, pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """One forward pass over chosen and rejected of every pair (sequence 2i is pair i's
    chosen, 2i+1 its rejected), laid out as `train.data.collate` lays out SFT examples, plus
    `sequence`: the sequence each position belongs to, for summing log-probs per sequence."""
    import torch

    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    batch = td.collate(seqs, packing, pad_id)
    if packing:
        lengths = torch.tensor([len(s) for s in seqs])
        batch["sequence"] = torch.repeat_interleave(torch.arange(len(seqs)), lengths).unsqueeze(0)
    else:
        batch["sequence"] = torch.arange(len(seqs)).unsqueeze(1).expand_as(batch["targets"])
    batch["n_sequences"] = len(seqs)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float64)
    return td.to_device(batch, device)


# ----------------------------------------------------------------------------- the maths


def sequence_logps(model: Any, batch: dict[str, Any], compute_dtype: Any) -> Any:
    """Sum of the labelled tokens' log-probs of each sequence in the batch: [n_sequences], fp64.

    As in `model.forward_loss`, only positions with a label go through the LM head. The
    per-token log-probs are summed per sequence with one index_add over `sequence`, in
    fp64 (the sums are differences of numbers in the hundreds; the reward is their change).
    """
    import torch

    logps, keep = token_logps(model, batch, compute_dtype)
    sums = torch.zeros(batch["n_sequences"], dtype=torch.float64, device=logps.device)
    return sums.index_add(0, batch["sequence"][keep], logps.double())


def token_logps(model: Any, batch: dict[str, Any], compute_dtype: Any) -> tuple[Any, Any]:
    """(log-prob of each labelled token [n_labelled] in fp32, the mask of labelled positions).
    Only labelled positions go through the LM head. Reinforcement fine-tuning weighs these
    one by one (reinforce/grpo.py); DPO sums them per sequence."""
    import torch
    import torch.nn.functional as F

    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask", "pack_index", "unpack_index") if k in batch}
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[keep])
    return -F.cross_entropy(logits.float(), targets[keep], reduction="none"), keep


def dpo_loss(policy: Any, reference: Any, beta: float) -> tuple[Any, Any]:
    """Per-pair sigmoid DPO loss and the implicit rewards.

    policy, reference: [pairs, 2] summed log-probs of (chosen, rejected).
    Returns (losses [pairs], rewards [pairs, 2]) with rewards = beta * (policy - reference):
    the loss is -log sigmoid(reward_chosen - reward_rejected), log(2) when they are equal.
    """
    import torch.nn.functional as F

    rewards = beta * (policy - reference)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards


def _pair_losses(model: Any, batch: dict[str, Any], beta: float, compute_dtype: Any) -> tuple[Any, Any]:
    logps = sequence_logps(model, batch, compute_dtype).view(-1, 2)
    return dpo_loss(logps, batch["ref_logps"], beta)


def _reward_sums(rewards: Any) -> list[float]:
    """[sum of chosen rewards, sum of rejected rewards, pairs with chosen strictly ahead]."""
    r = rewards.detach()
    return [r[:, 0].sum().item(), r[:, 1].sum().item(), float((r[:, 0] > r[:, 1]).sum().item())]


def reward_metrics(sums: Sequence[float], n_pairs: int) -> dict[str, float]:
    """Means over pairs of what `_reward_sums` summed (metrics.jsonl's DPO keys)."""
    n = max(1, n_pairs)
    chosen, rejected, correct = sums
    return {"rewards_chosen": chosen / n, "rewards_rejected": rejected / n,
            "reward_margin": (chosen - rejected) / n, "reward_accuracy": correct / n}


def accumulate_gradients(model: Any, pairs: list[TokenizedPair], step_pairs: int, cfg: Any, pad_id: int,
                         compute_dtype: Any, device: str, min_passes: int = 0,
                         filler: TokenizedPair | None = None) -> tuple[float, int, list[float]]:
    """Backward over micro-batches of `pairs`, each pair's loss divided by the step's pair
    count, so the summed gradient is that of the mean over the step's pairs whatever the
    micro-batching (`--micro-batch-size` counts pairs). Returns (sum of pair losses, tokens
    processed, reward sums as in `_reward_sums`).

    With FSDP every process must run as many passes: one with fewer runs `filler` with its
    loss times 0 (as run.accumulate_gradients does)."""
    loss_sum, tokens, sums = 0.0, 0, [0.0, 0.0, 0.0]
    passes = td.micro_batches(list(range(len(pairs))), cfg.micro_batch_size)
    for mb in passes:
        batch = collate_pairs([pairs[i] for i in mb], cfg.packing, pad_id, device)
        losses, rewards = _pair_losses(model, batch, cfg.beta, compute_dtype)
        (losses.sum() / step_pairs).backward()
        loss_sum += losses.sum().item()
        tokens += batch["tokens"]
        sums = [a + b for a, b in zip(sums, _reward_sums(rewards))]
    for _ in range(min_passes - len(passes)):
        batch = collate_pairs([filler], cfg.packing, pad_id, device)
        (_pair_losses(model, batch, cfg.beta, compute_dtype)[0].sum() * 0.0).backward()
    return loss_sum, tokens, sums


def evaluate(model: Any, pairs: list[TokenizedPair], cfg: Any, pad_id: int, compute_dtype: Any, dist: Any,
             check_stop: Callable[[], None] | None = None) -> dict[str, float]:
    """Mean DPO loss (valid_loss), reward accuracy and margin over the validation pairs (all
    processes). `check_stop()` runs between batches and may raise to abandon the pass."""
    import torch

    model.eval()
    everyone = list(range(len(pairs)))
    size = cfg.micro_batch_size or cfg.batch_size
    mine = td.micro_batches(td.shard(everyone, dist.rank, dist.world_size), size)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, chosen, rejected, correct, pairs
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # as run.evaluate: no second graph
            for mb in mine:
                if check_stop is not None:
                    check_stop()
                batch = collate_pairs([pairs[i] for i in mb], cfg.packing, pad_id, dist.device)
                losses, rewards = _pair_losses(model, batch, cfg.beta, compute_dtype)
                sums += torch.tensor([losses.sum().item(), *_reward_sums(rewards), len(mb)], dtype=torch.float64)
            if dist.fsdp:  # join the other processes' weight gathers
                most = max(len(td.micro_batches(td.shard(everyone, r, dist.world_size), size))
                           for r in range(dist.world_size))
                for _ in range(most - len(mine)):
                    _pair_losses(model, collate_pairs(pairs[:1], cfg.packing, pad_id, dist.device), cfg.beta,
                                 compute_dtype)
    finally:
        model.train()
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)
    loss, chosen, rejected, correct, n = sums.tolist()
    return {"valid_loss": loss / n, "valid_reward_accuracy": correct / n,
            "valid_reward_margin": (chosen - rejected) / n}


# ----------------------------------------------------------------------------- the reference


def reference_logps(model: Any, pairs: list[TokenizedPair], cfg: Any, pad_id: int, compute_dtype: Any, dist: Any,
                    adapter_is_reference: bool, layout: list[list[int]] | None = None) -> list[TokenizedPair]:
    """The pairs with the reference's summed log-probs filled in.

    Run before the first optimizer step and before FSDP sharding (every process holds the
    whole model, and each computes its share of the pairs; one all-reduce shares them).
    The reference is the model as it is now: with the adapter disabled (the base model),
    or, when `adapter_is_reference` (the adapter was loaded from --init-adapter), with it.
    `layout`: the micro-batches (pair indices) this process computes, by default its shard
    in batches of --micro-batch-size (or --batch-size); `reference_layout` gives the one
    that makes the first epoch's steps compute exactly what the reference computed.
    """
    import torch

    values = torch.zeros(len(pairs), 2, dtype=torch.float64, device=dist.device)
    mine = layout if layout is not None else td.micro_batches(
        td.shard(list(range(len(pairs))), dist.rank, dist.world_size), cfg.micro_batch_size or cfg.batch_size)
    adapter_off = contextlib.nullcontext() if adapter_is_reference else model.disable_adapter()
    model.eval()
    try:
        with torch.no_grad(), adapter_off:
            for mb in mine:
                batch = collate_pairs([pairs[i] for i in mb], cfg.packing, pad_id, dist.device)
                values[mb] = sequence_logps(model, batch, compute_dtype).view(-1, 2)
    finally:
        model.train()
    if dist.world_size > 1:
        torch.distributed.all_reduce(values)
    return [replace(p, ref_chosen=c, ref_rejected=r) for p, (c, r) in zip(pairs, values.tolist())]


def reference_layout(n_train: int, n_valid: int, cfg: Any, dist: Any) -> list[list[int]]:
    """This process's micro-batches for the reference pass over train + valid pairs, laid out
    as the first epoch's steps (then validation) will lay them out: the same pairs in the
    same micro-batches, in the same order. A forward pass then matches the policy's forward
    in those steps operation for operation, so before the adapter moves the two agree
    exactly (in bf16 too: the first loss is log(2) to the last bit), instead of up to the
    rounding of differently shaped matmuls."""
    layout = []
    for step in range(td.steps_per_epoch(n_train, cfg.batch_size)):
        indices = td.plan_step(n_train, cfg.batch_size, cfg.seed, step)[1]
        layout += td.micro_batches(td.shard(indices, dist.rank, dist.world_size), cfg.micro_batch_size)
    valid = td.shard(list(range(n_train, n_train + n_valid)), dist.rank, dist.world_size)
    return layout + td.micro_batches(valid, cfg.micro_batch_size or cfg.batch_size)


def prepare_reference(model: Any, train: list[TokenizedPair], valid: list[TokenizedPair], cfg: Any, pad_id: int,
                      compute_dtype: Any, dist: Any, out: Path, resume: bool, data_hashes: dict[str, str],
                      adapter_is_reference: bool, log: Callable[[str], None]) -> tuple[list, list]:
    """Train and validation pairs with reference log-probs: read back from OUT/REFERENCE_FILE
    when resuming a run over the same data, else computed (and written there by rank 0)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(out) / REFERENCE_FILE
    meta = {"data": json.dumps(data_hashes, sort_keys=True), "reference": "adapter" if adapter_is_reference else "base"}
    if resume and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            saved_meta = fh.metadata() or {}
        saved = load_file(str(path))
        if saved_meta == meta and len(saved["train"]) == len(train) and len(saved["valid"]) == len(valid):
            log(f"reference log-probs read from {path}")
            return ([replace(p, ref_chosen=c, ref_rejected=r) for p, (c, r) in zip(train, saved["train"].tolist())],
                    [replace(p, ref_chosen=c, ref_rejected=r) for p, (c, r) in zip(valid, saved["valid"].tolist())])
    t0 = time.perf_counter()
    both = reference_logps(model, train + valid, cfg, pad_id, compute_dtype, dist, adapter_is_reference,
                           reference_layout(len(train), len(valid), cfg, dist))
    train, valid = both[: len(train)], both[len(train):]
    which = "the --init-adapter" if adapter_is_reference else "the base model, adapter disabled"
    log(f"reference log-probs of {len(both)} pairs ({which}) in {time.perf_counter() - t0:.1f}s")
    if dist.main:
        path.parent.mkdir(parents=True, exist_ok=True)

        def table(pairs):
            return torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float64).reshape(-1, 2)

        tmp = path.with_suffix(".tmp")
        save_file({"train": table(train), "valid": table(valid)}, str(tmp), metadata=meta)
        tmp.replace(path)
    return train, valid

