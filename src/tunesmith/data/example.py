"""The one internal example type every data format normalises to."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tunesmith.data.tool_syntax import calls_text
from tunesmith.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = False
    """Whether the loss covers this message. Only assistant messages are ever trained;
    an assistant message with OpenAI's `weight: 0` has train=False."""
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The dict a Hugging Face chat template expects."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Example:
    """A conversation to train on, with where it came from (1-based line or CSV row)."""

    messages: tuple[Message, ...]
    line: int = 0
    tools: list[dict[str, Any]] | None = None

    @property
    def trained_messages(self) -> list[Message]:
        return [m for m in self.messages if m.train]

    def key(self) -> tuple:
        """Identity for duplicate and overlap checks."""
        return tuple((m.role, m.content.strip(), m.train) for m in self.messages)


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt conversation with a preferred and a non-preferred assistant answer (DPO)."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    line: int = 0

    def sequences(self) -> tuple[Example, Example]:
        """The two conversations DPO compares: the prompt followed by the chosen answer, and
        by the rejected one. Only the answers' assistant messages are trained; an assistant
        turn inside the prompt is context (both sequences share it), never trained."""
        prompt = tuple(replace(m, train=False) for m in self.prompt)
        return Example(prompt + self.chosen, line=self.line), Example(prompt + self.rejected, line=self.line)

    def key(self) -> tuple:
        return (
            tuple((m.role, m.content.strip()) for m in self.prompt),
            tuple(m.content.strip() for m in self.chosen),
            tuple(m.content.strip() for m in self.rejected),
        )


def chat(*turns: tuple[str, str], line: int = 0) -> Example:
    """Build an Example from (role, content) pairs; assistant turns are trained."""
    return Example(
        messages=tuple(Message(role, content, train=role == "assistant") for role, content in turns),
        line=line,
    )


def split_example(example: Example) -> tuple[list[Message], str]:
    """The conversation up to the last assistant turn (the prompt) and that turn (the reference;
    its tool calls written in the syntax a model is trained and served with)."""
    msgs = list(example.messages)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last is None:
        raise DataError(f"line {example.line}: the example has no assistant answer to compare against")
    if msgs[last].tool_calls:
        return msgs[:last], calls_text(msgs[last].content, msgs[last].tool_calls)
    return msgs[:last], msgs[last].content


@dataclass
class Problem:
    """One error or warning about the data, with where it is."""

    line: int
    field: str
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "code": self.code, "message": self.message}


@dataclass
class ParseResult:
    """What reading a file gives: examples plus every problem met on the way."""

    format: str
    examples: list[Example] = field(default_factory=list)
    preferences: list[PreferenceExample] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ColumnMapping:
    """How a CSV/TSV row becomes a chat example."""

    input_column: str = "text"
    output_column: str | None = None
    """None reads prompts only (for evaluation or distillation inputs)."""
    system: str | None = None


@dataclass
class Record:
    """One line (or CSV row) read: its example, or the problems that kept it out."""

    line: int
    example: Example | PreferenceExample | None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
