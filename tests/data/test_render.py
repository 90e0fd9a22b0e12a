"""Loss masking and prompt rendering through the real chat template."""

from __future__ import annotations

import pytest

from tunesmith.data.example import Example, Message, chat
from tunesmith.data.render import IGNORE_INDEX, render_example, render_prompt, end_of_turn_ids


def trained_text(tok, te) -> list[str]:
    """Decode each contiguous run of labelled positions."""
    runs, cur = [], []
    for t, lab in zip(te.input_ids, te.labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_single_turn_trains_answer_and_end_token(tiny_tokenizer):
    te = render_example(tiny_tokenizer, chat(("user", "What is the capital?"), ("assistant", "Paris.")))
    assert trained_text(tiny_tokenizer, te) == ["Paris.<|im_end|>"]


def test_multi_turn_with_system_and_weight_zero(tiny_tokenizer):
    ex = Example(
        messages=(
            Message("system", "Be short."),
            Message("user", "first question"),
            Message("assistant", "skip me", train=False),
            Message("user", "second question"),
            Message("assistant", "keep me", train=True),
            Message("user", "third"),
            Message("assistant", "and me", train=True),
        )
    )
    te = render_example(tiny_tokenizer, ex)
    assert trained_text(tiny_tokenizer, te) == ["keep me<|im_end|>", "and me<|im_end|>"]
    # System and user text never carries a label.
    assert "Be short" not in "".join(trained_text(tiny_tokenizer, te))


def test_exactly_one_bos(tiny_tokenizer):
    te = render_example(tiny_tokenizer, chat(("user", "hi"), ("assistant", "yo")))
    assert te.input_ids.count(tiny_tokenizer.bos_token_id) == 3  # system, user, assistant headers
    assert te.input_ids[0] == tiny_tokenizer.bos_token_id
    assert te.input_ids[1] != tiny_tokenizer.bos_token_id


def test_prompt_is_training_prefix(tiny_tokenizer):
    conv = chat(("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    te = render_example(tiny_tokenizer, conv)
    prompt = render_prompt(tiny_tokenizer, conv.messages[:3])
    assert te.input_ids[: len(prompt)] == prompt
    # The first label after the prompt is the answer's first token.
    assert te.labels[len(prompt)] != IGNORE_INDEX
    assert te.labels[len(prompt) - 1] == IGNORE_INDEX


def test_truncation_flags(tiny_tokenizer):
    te = render_example(tiny_tokenizer, chat(("user", "hello"), ("assistant", "a long answer " * 20)), max_seq_len=30)
    assert len(te.input_ids) == 30 and te.truncated and te.assistant_truncated
    assert te.full_length > 30


def test_end_of_turn_ids(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tiny_tokenizer)


@pytest.mark.slow
def test_smollm2_masking(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert tok.pad_token_id != tok.eos_token_id
    te = render_example(tok, chat(("user", "What is the capital of France?"), ("assistant", "Paris.")))
    assert trained_text(tok, te) == ["Paris.<|im_end|>"]
    assert te.input_ids[0] == tok.bos_token_id and te.input_ids[1] != tok.bos_token_id


class CountingTemplate:
    """The tiny tokenizer, counting how many times its chat template is rendered."""

    def __init__(self, tok):
        self.tok, self.renders = tok, 0

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self.tok.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("n_turns", [3, 300])
def test_rendering_a_long_conversation_renders_the_template_a_fixed_number_of_times(tiny_tokenizer, n_turns):
    """Issue 19: rendering each assistant turn's prefix made 2,001 short messages take 46 s on
    the server's event loop. Now the renders per conversation do not grow with its length, and
    the tokens are those the prefix-by-prefix way gives."""
    from tunesmith.data import render

    messages = []
    for k in range(n_turns):
        messages += [Message("user", f"question {k}"), Message("assistant", f" answer {k}", train=True)]
    messages.append(Message("user", "last"))
    counting = CountingTemplate(tiny_tokenizer)
    render._marking_works(counting)  # the once-per-tokenizer probe, not counted below
    counting.renders = 0
    ids = render_prompt(counting, messages)
    assert counting.renders <= 4
    dicts = [m.to_template() for m in messages]
    full = render._apply(tiny_tokenizer, dicts, None, True)
    specials = render._special_tokens(tiny_tokenizer)
    exact = [render._rendered_span(tiny_tokenizer, messages, dicts, None, True, full, specials, i)
             for i, m in enumerate(messages) if m.role == "assistant"]
    assert render._marked_spans(tiny_tokenizer, messages, dicts, None, True, full, specials) == exact
    assert ids == render_prompt(tiny_tokenizer, messages)

