"""Batched greedy generation and reference loss, with the same rendering as training.

Prompts come from `tunesmith.data.render.render_prompt` (the training rendering plus the
assistant generation prompt), so a fine-tuned adapter sees token for token what it was
trained on. Generation is greedy, batched with left padding and a KV cache, and stops a
row at the template's end-of-turn token(s). Rows are sorted by length before batching,
so padding stays small; results come back in the caller's order.

    python -c "from tunesmith.evaluate.generate import generate; help(generate)"
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tunesmith.data.example import Example, Message
from tunesmith.data.render import IGNORE_INDEX, end_of_turn_ids, render_examples, render_prompt
from tunesmith.errors import DataError, UsageError
from tunesmith.models.inference import autocast, causal_lm, pad_id


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    """Wall time of the row's batch divided by the rows in it (amortised, batched)."""


def split_example(example: Example) -> tuple[list[Message], str]:
    """The conversation up to the last assistant turn (the prompt) and that turn (the reference)."""
    msgs = list(example.messages)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last is None:
        raise DataError(f"line {example.line}: the example has no assistant answer to compare against")
    return msgs[:last], msgs[last].content


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    on_batch: Callable[[int], None] | None = None,
    json_schema: dict[str, Any] | None = None,
) -> list[Generation]:
    """Greedy completions of chat prompts (lists of Messages ending before the answer);
    with `json_schema`, each held to one JSON value of it as the server's JSON mode holds
    answers ({"type": "object"}: any object)."""
    ids = [render_prompt(tokenizer, p) for p in prompts]
    return generate_ids(model, tokenizer, ids, max_new_tokens, batch_size, precision, on_batch, json_schema)


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    on_batch: Callable[[int], None] | None = None,
    json_schema: dict[str, Any] | None = None,
) -> list[Generation]:
    import torch

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompt_ids:
        return []
    stop = set(end_of_turn_ids(tokenizer))
    factory = None
    if json_schema is not None:  # read once, a fresh matcher per answer
        from tunesmith.generate.json_schema import compile_schema

        factory = compile_schema(json_schema)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    with torch.inference_mode(), autocast(precision, device.type):
        t0 = time.perf_counter()
        prefix = shared_prefix(prompt_ids)
        prefix_cache = None
        if len(prefix) >= MIN_SHARED_PREFIX:
            prefix_cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache
        else:
            prefix = []
        prefix_share = (time.perf_counter() - t0) / len(prompt_ids)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            t0 = time.perf_counter()
            suffixes = [prompt_ids[i][len(prefix):] for i in rows]
            constrain = _json_constraint(tokenizer, factory, len(rows), stop) if factory is not None else None
            outs = _greedy_batch(model, suffixes, max_new_tokens, stop, pad_id(tokenizer), device, prefix_cache,
                                 len(prefix), constrain)
            per_row = (time.perf_counter() - t0) / len(rows) + prefix_share
            for i, new in zip(rows, outs):
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = Generation(text.strip(), len(prompt_ids[i]), len(new), per_row)
            if on_batch:
                on_batch(len(rows))
    return results  # type: ignore[return-value]


# Prompts sharing at least this many leading tokens (a long system prompt, a label list,
# fixed few-shot examples) compute them once and reuse their KV cache in every batch.
MIN_SHARED_PREFIX = 32


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


def _json_constraint(tokenizer: Any, factory: Any, rows: int, stop: set[int]) -> Callable[..., int]:
    """For a batch: (row, greedy token, logits, tokens so far) -> the token JSON mode takes."""
    from tunesmith.generate.json_mode import JsonAnswer

    answers = [JsonAnswer(factory=factory) for _ in range(rows)]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def choose(row: int, first: int, logits: Any, so_far: list[int]) -> int:
        return answers[row].next_token(first, logits, None, None, so_far, stop, decode)

    return choose


def _greedy_batch(
    model: Any, batch: list[list[int]], max_new_tokens: int, stop: set[int], pad: int, device: Any,
    prefix_cache: Any = None, prefix_len: int = 0, constrain: Callable[..., int] | None = None,
) -> list[list[int]]:
    """One left-padded batch: prefill, then one token per step from the KV cache.

    With a prefix cache the rows continue a shared prefix: its cache is copied per row and
    the padding sits between prefix and row, masked out. Returns each row's new tokens up
    to (and without) its end-of-turn token."""
    import copy

    import torch

    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    # Left padding shifts every row; positions must count real tokens only.
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(batch))
        mask = torch.cat([torch.ones(len(batch), prefix_len, dtype=mask.dtype, device=device), mask], dim=1)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    cache = out.cache
    new: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        tok = logits.argmax(-1)
        for r, t in enumerate(tok.tolist()):
            if done[r]:
                continue
            if constrain is not None:
                t = constrain(r, t, logits[r].float(), new[r])
                tok[r] = t
            if t in stop:
                done[r] = True
            else:
                new[r].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
            cache=cache, use_cache=True,
        )
        cache = out.cache
        next_pos = next_pos + 1
    return new


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
