"""Render examples with the model's own chat template into input ids and loss labels.

Training, validation, `inspect`, evaluation and the server all go through this module, so
the tokens a model is trained on are exactly the tokens it is prompted with later.

How it works: the conversation is rendered once with the template; for every assistant
turn the template is rendered again up to that turn (with the generation prompt) and up
to its end, which gives character spans. The text is cut at those spans into segments
and each segment is tokenized on its own, so no token straddles a trained/untrained
boundary and an inference prompt (the same segments up to the generation prompt) has the
same tokens as training had for that prefix. A trained span covers the answer and the
end-of-turn special token(s) the template closes the turn with (`<|im_end|>` for ChatML),
so the model learns to stop; the whitespace after that token is not trained.

    python -c "from tunesmith.data.render import render_example; help(render_example)"
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from tunesmith.data.example import Example, Message
from tunesmith.data.tool_format import for_template, template_syntax
from tunesmith.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Segment:
    text: str
    trained: bool


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where the loss does not look."""
    line: int = 0
    full_length: int = 0
    """Token count before truncation."""
    truncated: bool = False
    assistant_truncated: bool = False
    """A trained turn lost tokens to truncation."""
    eos_trained: bool = True
    """Every trained turn ends with a trained end-of-turn special token."""

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


class TemplateError(DataError):
    """The chat template cannot render this conversation."""


def _apply(tokenizer: Any, messages: list[dict], tools: Any, add_generation_prompt: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja raises many types; report them all as one sentence
        raise TemplateError(f"the model's chat template cannot render this conversation: {exc}") from exc


def _special_tokens(tokenizer: Any) -> list[str]:
    cached = getattr(tokenizer, "_tunesmith_specials", None)
    if cached is None:
        specials = set(tokenizer.all_special_tokens)
        for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        # Longest first, so that a token that contains another is matched whole.
        cached = sorted((s for s in specials if s), key=len, reverse=True)
        try:
            tokenizer._tunesmith_specials = cached
        except AttributeError:
            pass
    return cached


def _end_of_turn(suffix: str, specials: Sequence[str]) -> int:
    """Length of the part of `suffix` to train: through its last special token, 0 if none."""
    end = 0
    i = 0
    while i < len(suffix):
        for s in specials:
            if suffix.startswith(s, i):
                end = i + len(s)
                i += len(s)
                break
        else:
            i += 1
    return end


def needs_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer normally adds a BOS that the rendered text must then carry."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def conversation_segments(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Any = None,
    add_generation_prompt: bool = False,
) -> tuple[list[Segment], bool]:
    """Cut the rendered conversation into trained and untrained text segments.

    Returns the segments and whether every trained turn ends in a special token.
    With add_generation_prompt the text ends with the assistant prompt (for inference).
    Linear in the number of messages where the template allows it (see _marked_spans);
    otherwise every assistant turn renders its prefix (quadratic, bounded by the server's
    message limit).
    """
    messages, tools = for_template(tokenizer, messages, tools)  # tool calls in the template's syntax
    dicts = [m.to_template() for m in messages]
    full = _apply(tokenizer, dicts, tools, add_generation_prompt)
    specials = _special_tokens(tokenizer)
    spans = None
    if _marking_works(tokenizer):
        spans = _marked_spans(tokenizer, messages, dicts, tools, add_generation_prompt, full, specials)
    if spans is None:
        spans = [_rendered_span(tokenizer, messages, dicts, tools, add_generation_prompt, full, specials, i)
                 for i, m in enumerate(messages) if m.role == "assistant"]
    segments: list[Segment] = []
    cursor = 0
    eos_ok = True
    for i, start, trained_end, has_eot in spans:
        if start < cursor:
            raise TemplateError(_NOT_PREFIX_STABLE)
        if not has_eot and messages[i].train:
            eos_ok = False
        if start > cursor:
            segments.append(Segment(full[cursor:start], False))
        segments.append(Segment(full[start:trained_end], messages[i].train))
        cursor = trained_end
    if cursor < len(full):
        segments.append(Segment(full[cursor:], False))
    return [s for s in segments if s.text], eos_ok


_NOT_PREFIX_STABLE = ("the model's chat template renders earlier turns differently once later turns are added, so "
                      "assistant turns cannot be located; use a template without history-dependent rendering")


Span = tuple[int, int, int, bool]
"""An assistant turn: (message index, start, trained end, ends in a special token)."""


def _rendered_span(tokenizer: Any, messages: Sequence[Message], dicts: list[dict], tools: Any,
                   add_generation_prompt: bool, full: str, specials: Sequence[str], i: int) -> Span:
    """Assistant turn i by rendering the conversation up to it (with the generation prompt)
    and up to its end: (i, start, trained end, ends in a special token). Exact for any
    template, and as costly as the turn's prefix."""
    start = len(_apply(tokenizer, dicts[:i], tools, True))
    # The conversation up to its last message is `full` itself: one render fewer per
    # example for the common single-answer case (validate's speed budget counts it).
    last = i + 1 == len(dicts) and not add_generation_prompt
    end = len(full) if last else len(_apply(tokenizer, dicts[: i + 1], tools, False))
    if end > len(full) or end < start:
        raise TemplateError(_NOT_PREFIX_STABLE)
    turn = full[start:end]
    content = messages[i].content
    if not content or turn.startswith(content):
        content_at = 0
    else:
        content_at = turn.rfind(content)
    if content_at < 0:  # the template rewrote the content (trim, reformatting): keep it whole
        body_end = len(turn.rstrip())
    else:
        body_end = content_at + len(content)
    eot = _end_of_turn(turn[body_end:], specials)
    return i, start, start + body_end + eot, eot > 0


def _marked_spans(tokenizer: Any, messages: Sequence[Message], dicts: list[dict], tools: Any,
                  add_generation_prompt: bool, full: str, specials: Sequence[str]) -> list[Span] | None:
    """Every assistant turn's span from one more render, in which each message's content
    starts with a unique marker: a turn starts where its content does and is trained through
    the special tokens that follow it. None when that render, markers removed, differs from
    `full` (the template looks at the content), or when the last turn's span differs from
    the exact one (_rendered_span, checked once per conversation): the caller renders each
    prefix instead."""
    if not any(m.role == "assistant" for m in messages):
        return []
    nonce = secrets.token_hex(6)
    markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(dicts))]
    marked = [{**d, "content": markers[i] + (d.get("content") or "")} for i, d in enumerate(dicts)]
    try:
        text = _apply(tokenizer, marked, tools, add_generation_prompt)
    except TemplateError:
        return None
    # Marker i's position in `full` is its position in `text` less the markers before it.
    pieces = re.split("(\ue000" + nonce + ":[0-9]+\ue001)", text)
    at: dict[int, int] = {}
    plain: list[str] = []
    length = 0
    for k, piece in enumerate(pieces):
        if k % 2:
            index = int(piece[len(nonce) + 2:-1])
            if index in at:
                return None
            at[index] = length
        else:
            plain.append(piece)
            length += len(piece)
    if len(at) != len(dicts) or "".join(plain) != full:
        return None
    bounds = sorted(at.values()) + [len(full)]
    spans = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        start = at[i]
        body_end = start + len(m.content)
        if full[start:body_end] != m.content:
            return None
        limit = next(b for b in bounds if b > body_end) if body_end < len(full) else len(full)
        eot = _first_special_run(full, body_end, limit, specials)
        spans.append((i, start, body_end + eot, eot > 0))
    last = spans[-1][0]
    if _rendered_span(tokenizer, messages, dicts, tools, add_generation_prompt, full, specials, last) != spans[-1]:
        return None
    return spans


def _first_special_run(text: str, start: int, stop: int, specials: Sequence[str]) -> int:
    """Characters from `start` through the first run of adjacent special tokens before `stop`
    (0 if there is none): an assistant turn's end-of-turn token(s)."""
    i, end = start, 0
    while i < stop:
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is not None:
            i += len(hit)
            end = i - start
        elif end:
            break
        else:
            i += 1
    return end


_PROBE = [Message("system", "s"), Message("user", "u1"), Message("assistant", "a1", train=True),
          Message("user", "u2"), Message("assistant", "a2", train=True), Message("user", "u3")]


def _marking_works(tokenizer: Any) -> bool:
    """Whether the one-render way finds the same spans as rendering each prefix, on a probe
    conversation (checked once per tokenizer)."""
    cached = getattr(tokenizer, "_tunesmith_marking", None)
    if cached is None:
        cached = True
        specials = _special_tokens(tokenizer)
        for msgs in (_PROBE, _PROBE[:-1]):
            for gen in (False, True):
                dicts = [m.to_template() for m in msgs]
                try:
                    full = _apply(tokenizer, dicts, None, gen)
                    exact = [_rendered_span(tokenizer, msgs, dicts, None, gen, full, specials, i)
                             for i, m in enumerate(msgs) if m.role == "assistant"]
                except TemplateError:
                    cached = False
                    break
                if _marked_spans(tokenizer, msgs, dicts, None, gen, full, specials) != exact:
                    cached = False
        try:
            tokenizer._tunesmith_marking = cached
        except AttributeError:
            pass
    return cached


def _tokenize_segments(tokenizer: Any, batch: list[list[Segment]]) -> list[tuple[list[int], list[int]]]:
    flat = [s.text for segs in batch for s in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    out = []
    k = 0
    for segs in batch:
        input_ids: list[int] = []
        labels: list[int] = []
        if bos and not (segs and segs[0].text.startswith(tokenizer.bos_token)):
            input_ids += bos
            labels += [IGNORE_INDEX]
        for s in segs:
            piece = ids[k]
            k += 1
            input_ids += piece
            labels += piece if s.trained else [IGNORE_INDEX] * len(piece)
        out.append((input_ids, labels))
    return out


def render_examples(
    tokenizer: Any, examples: Sequence[Example], max_seq_len: int | None = None
) -> list[TokenizedExample]:
    """Tokenize many examples at once (one batched tokenizer call).

    Truncation rule: an example longer than max_seq_len keeps its first max_seq_len
    tokens (system prompt and question first); `assistant_truncated` marks one that lost
    trained tokens, and one left with no trained token is for the caller to drop.
    Raises TemplateError (with the example's line) when the template cannot render one.
    """
    batch: list[list[Segment]] = []
    eos_flags: list[bool] = []
    for ex in examples:
        try:
            segs, eos_ok = conversation_segments(tokenizer, ex.messages, ex.tools)
        except TemplateError as exc:
            raise TemplateError(f"line {ex.line}: {exc}") from exc
        batch.append(segs)
        eos_flags.append(eos_ok)
    out = []
    for ex, (ids, labels), eos_ok in zip(examples, _tokenize_segments(tokenizer, batch), eos_flags):
        full_len = len(ids)
        truncated = max_seq_len is not None and full_len > max_seq_len
        assistant_truncated = False
        if truncated:
            assistant_truncated = any(t != IGNORE_INDEX for t in labels[max_seq_len:])
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        out.append(
            TokenizedExample(
                input_ids=ids,
                labels=labels,
                line=ex.line,
                full_length=full_len,
                truncated=truncated,
                assistant_truncated=assistant_truncated,
                eos_trained=eos_ok,
            )
        )
    return out


def render_example(tokenizer: Any, example: Example, max_seq_len: int | None = None) -> TokenizedExample:
    """Input ids and labels for one example; see render_examples for the rules."""
    return render_examples(tokenizer, [example], max_seq_len)[0]


def render_prompt(tokenizer: Any, messages: Sequence[Message], tools: Any = None) -> list[int]:
    """Token ids of a conversation plus the assistant generation prompt, for inference.

    Token for token what training produced for the same prefix (same segments, one BOS).
    """
    segs, _ = conversation_segments(tokenizer, messages, tools, add_generation_prompt=True)
    return _tokenize_segments(tokenizer, [segs])[0][0]


def tokens_per_message(tokenizer: Any) -> dict[str, int]:
    """The tokens the template adds around a user and an assistant message, measured with
    empty content: a lower bound on what each such message costs a prompt, so that a
    conversation that cannot fit the context is known without rendering it. A role the
    template renders as nothing, or a template that cannot be probed, counts 0."""
    def length(roles: str) -> int:
        msgs = [Message("user" if r == "u" else "assistant", "") for r in roles]
        return len(tokenizer(render_text(tokenizer, msgs), add_special_tokens=False)["input_ids"])

    try:
        user = length("uau") - length("ua")
        assistant = length("uaua") - length("uau")
    except (TemplateError, ValueError, TypeError):
        return {}
    return {"user": max(0, user), "assistant": max(0, assistant)}


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the template's closing special token, EOS, and
    the special tokens the template's tool syntax may end a call with (Llama 3.x's <|eom_id|>)."""
    probe = [Message("user", "x"), Message("assistant", "y", train=True)]
    segs, _ = conversation_segments(tokenizer, probe)
    ids: set[int] = set()
    specials = _special_tokens(tokenizer)
    for s in segs:
        if s.trained:
            tail = s.text[len("y"):] if s.text.startswith("y") else s.text
            for sp in specials:
                if sp in tail:
                    ids.add(tokenizer.convert_tokens_to_ids(sp))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    syntax = template_syntax(tokenizer)
    for token in syntax.end_tokens if syntax else ():
        if token in specials:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(ids)


def render_text(tokenizer: Any, messages: Sequence[Message], tools: Any = None, add_generation_prompt: bool = False) -> str:
    """The chat template's text for a conversation (for display and audits, not for training)."""
    messages, tools = for_template(tokenizer, messages, tools)
    return _apply(tokenizer, [m.to_template() for m in messages], tools, add_generation_prompt)
