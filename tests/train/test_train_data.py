"""What the training loop sees: targets, BOS, truncation and drops, batch plans."""

from __future__ import annotations

import pytest

from tunesmith.data.example import Example, Message, chat
from tunesmith.data.render import IGNORE_INDEX
from tunesmith.errors import DataError
from tunesmith.train import data as td


def target_runs(tok, batch) -> list[str]:
    """Decode each contiguous run of target tokens of a packed batch, as the loss sees them."""
    targets = batch["targets"][0].tolist()
    ids = batch["input_ids"][0].tolist()
    runs, cur = [], []
    for pos, t in enumerate(targets):
        if t != IGNORE_INDEX:
            assert t == ids[pos + 1], "a target must be the next input token"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_targets_are_answers_plus_end_token(tiny_tokenizer):
    examples = [
        chat(("user", "What is the capital?"), ("assistant", "Paris.")),
        Example(messages=(
            Message("system", "Be short."),
            Message("user", "first question"),
            Message("assistant", "skip me", train=False),
            Message("user", "second question"),
            Message("assistant", "keep me", train=True),
            Message("user", "third"),
            Message("assistant", "and me", train=True),
        )),
        chat(("system", "You answer in JSON."), ("user", "label?"), ("assistant", '{"a": 1}')),
    ]
    kept, stats = td.render_and_filter(tiny_tokenizer, examples, 512, "test")
    batch = td.collate(kept, packing=True, pad_id=tiny_tokenizer.pad_token_id)
    assert target_runs(tiny_tokenizer, batch) == [
        "Paris.<|im_end|>", "keep me<|im_end|>", "and me<|im_end|>", '{"a": 1}<|im_end|>'
    ]
    # No example's last position predicts the next example's first token.
    ends = batch["cu_seq_lens"].tolist()[1:]
    assert all(batch["targets"][0, e - 1].item() == IGNORE_INDEX for e in ends)
    assert td.trained_tokens(kept) == int((batch["targets"] != IGNORE_INDEX).sum())
    assert stats.examples == 3 and stats.dropped_no_trained_tokens == 0


def test_padded_batch_has_same_targets(tiny_tokenizer):
    examples = [chat(("user", "hi"), ("assistant", "yo")), chat(("user", "a longer question here"), ("assistant", "ok then"))]
    kept, _ = td.render_and_filter(tiny_tokenizer, examples, 512, "test")
    packed = td.collate(kept, packing=True, pad_id=0)
    padded = td.collate(kept, packing=False, pad_id=0)
    assert sorted(packed["targets"][packed["targets"] != IGNORE_INDEX].tolist()) == sorted(
        padded["targets"][padded["targets"] != IGNORE_INDEX].tolist()
    )
    assert padded["tokens"] == packed["tokens"] == sum(len(k) for k in kept)


def _bos_tokenizer(template_has_bos: bool):
    from tokenizers.processors import TemplateProcessing

    from tiny_model import CHATML_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.bos_token = "<|endoftext|>"
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)])
    tok.chat_template = ("{{ bos_token }}" if template_has_bos else "") + CHATML_TEMPLATE
    return tok, bos_id


@pytest.mark.parametrize("template_has_bos", [False, True])
def test_exactly_one_bos_per_example(template_has_bos):
    tok, bos = _bos_tokenizer(template_has_bos)
    assert tok("a")["input_ids"][0] == bos  # this tokenizer adds a BOS by itself
    kept, _ = td.render_and_filter(tok, [chat(("user", "hi"), ("assistant", "yo"))] * 3, 512, "test")
    batch = td.collate(kept, packing=True, pad_id=0)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(bos) == 3
    assert [ids[s] for s in batch["cu_seq_lens"].tolist()[:-1]] == [bos] * 3


def test_truncation_drops_and_counts(tiny_tokenizer):
    short = chat(("user", "hi"), ("assistant", "yo"))
    limit = len(td.render_and_filter(tiny_tokenizer, [short], 4096, "x")[0][0]) + 4
    long_prompt = chat(("user", "question " * 60), ("assistant", "answer"))
    long_answer = chat(("user", "hi"), ("assistant", "answer " * 60))
    kept, stats = td.render_and_filter(tiny_tokenizer, [short] * 18 + [long_prompt, long_answer], limit, "f.jsonl")
    assert stats.dropped_no_trained_tokens == 1  # the long prompt left no answer token
    assert stats.truncated == 2 and stats.answer_truncated == 2
    assert len(kept) == 19 and all(len(k) <= limit for k in kept)
    with pytest.raises(DataError, match=rf"f.jsonl: 2 of 10 examples would have no token to train on.*--max-seq-len {limit}"):
        td.render_and_filter(tiny_tokenizer, [short] * 8 + [long_prompt] * 2, limit, "f.jsonl")


def test_plan_is_a_function_of_seed_and_step():
    n, bs = 10, 4
    spe = td.steps_per_epoch(n, bs)
    assert spe == 3
    epoch0 = [td.plan_step(n, bs, 1, s)[1] for s in range(spe)]
    assert sorted(i for b in epoch0 for i in b) == list(range(n))
    assert td.plan_step(n, bs, 1, 3)[0] == 1 and td.plan_step(n, bs, 1, 3)[1] != epoch0[0]
    assert td.plan_step(n, bs, 1, 4) == td.plan_step(n, bs, 1, 4)
    assert td.shard([5, 6, 7, 8, 9], 0, 2) == [5, 7, 9] and td.shard([5, 6, 7, 8, 9], 1, 2) == [6, 8]
    assert td.micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
