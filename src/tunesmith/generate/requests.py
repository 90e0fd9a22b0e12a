"""What a caller gives the engine and gets back: sampling settings, streamed events, finished
completions, model cards, a request's handle, and the errors a request can meet.

    python -c "from tunesmith.generate.requests import SamplingParams; print(SamplingParams(32, 0.0))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.errors import ModelNotFoundError, TunesmithError, UsageError
from tunesmith.generate.constraints import Constraint


class UnknownModelError(ModelNotFoundError):
    """A request named a model id this engine does not serve."""


class AdapterConflictError(UsageError):
    """An adapter name that is already taken (or still draining)."""


class EngineOverloaded(TunesmithError):
    """The engine's waiting queue is full; the request may be sent again shortly."""

    retry_after_s = 1


class EngineStopped(TunesmithError):
    """The engine's process is gone (killed, or out of memory): nothing is generated until the
    server is restarted (the server's 503)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None
    """What the answer is held to (a JSON Schema, a regex, a choice, a grammar; see
    generate/constraints.py); None: free text."""


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: new text, and the reason when it ends."""

    text: str
    finish_reason: str | None = None
    """"stop" (end of turn or a stop string), "length" (max_tokens or context), "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """One finished row of `generate_batch`."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    """Wall time of the whole batch divided by its rows (amortised: rows run together)."""
    token_ids: tuple[int, ...] = ()
    """The tokens sampled, the end-of-turn token included when the answer ended with it
    (what reinforcement fine-tuning trains on: re-tokenizing the text need not give them back)."""


@dataclass
class ModelCard:
    id: str
    created: int
    parent: str | None = None
    """The base model's id for an adapter; None for the base itself."""
    path: str | None = None


class Handle:
    """A submitted request; `cancel()` frees its row at the next step (idempotent)."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
