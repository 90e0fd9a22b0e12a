"""Prompt rows for reinforcement fine-tuning, in OpenAI's RFT file shape.

Each JSONL line is an object with `messages` (the conversation the model answers: no
assistant message at its end) and any other fields. The whole line is the grader's `item`,
so `{{item.label}}` reads the line's `label` and `{{item.messages}}` its messages, as in
OpenAI's reinforcement fine-tuning. Unlike the supervised formats, other keys are not
refused: they are what the grader compares against.

    python -c "from tunesmith.data.prompts import read_prompt_rows; print(read_prompt_rows('rft.jsonl')[0][:2])"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.example import Message, Problem
from tunesmith.data.formats import check_path, iter_lines, load_json_line, parse_messages
from tunesmith.data.render import render_prompt

PROMPTS_FORMAT = "prompts"
"""The format name reinforcement jobs train on (FileCheck.format, run.json)."""


@dataclass(frozen=True)
class PromptRow:
    """One line: the conversation to answer and the whole line as the grader's item."""

    line: int
    messages: list[Message]
    item: dict[str, Any] = field(default_factory=dict)


def read_prompt_rows(path: str | Path) -> tuple[list[PromptRow], list[Problem]]:
    """Every row of a prompts file, and every problem met (line-numbered, as the other readers)."""
    path = check_path(path)
    rows: list[PromptRow] = []
    problems: list[Problem] = []
    for line, text, error in iter_lines(path):
        if error is not None:
            problems.append(Problem(line, "", "invalid_encoding", error))
            continue
        try:
            obj = load_json_line(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(line, "", "invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(line, "", "not_an_object", "each line must be a JSON object with 'messages'"))
            continue
        if "messages" not in obj:
            problems.append(Problem(line, "messages", "missing_messages",
                                    "no 'messages': each line holds the conversation the model answers "
                                    "(e.g. [{\"role\": \"user\", \"content\": \"...\"}]) and the fields the grader reads"))
            continue
        messages = parse_messages(obj["messages"], "messages", line, problems)
        if messages is None:
            continue
        if not messages:
            problems.append(Problem(line, "messages", "empty_messages", "'messages' is empty"))
        elif messages[-1].role == "assistant":
            problems.append(Problem(line, f"messages[{len(messages) - 1}].role", "ends_with_answer",
                                    "the last message is the assistant's: a reinforcement prompt ends where the model "
                                    "answers; put the reference answer in a field of its own (e.g. \"answer\")"))
        else:
            rows.append(PromptRow(line, messages, obj))
    if not rows and not problems:
        problems.append(Problem(0, "", "empty_file", f"'{path}' holds no rows"))
    return rows, problems


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt row as the model sees it: the chat template's tokens up to the answer."""

    prompt_ids: list[int]
    item: dict[str, Any]
    line: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)


def render_prompt_rows(tokenizer: Any, rows: list[PromptRow], max_prompt_tokens: int) -> tuple[list[RenderedPrompt], int]:
    """Each row's prompt tokens (exactly what serving renders), and how many rows were left out
    for being longer than `max_prompt_tokens` (an answer must still fit after them)."""
    rendered = [RenderedPrompt(render_prompt(tokenizer, r.messages), r.item, r.line) for r in rows]
    kept = [p for p in rendered if len(p) <= max_prompt_tokens]
    return kept, len(rendered) - len(kept)
