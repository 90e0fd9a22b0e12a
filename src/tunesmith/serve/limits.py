"""The work one HTTP request may ask of the server, checked before any rendering or generation.

Every limit is refused with OpenAI's error shape, a 400 whose `param` names the part of the
request and whose `code` names the limit (docs/serving.md lists them). The engine's own
bounds (a token budget per step, a bounded waiting queue answered with 429
`server_overloaded`, one turn per request in admission) are in generate/engine.py.

    python -c "from tunesmith.serve.limits import Limits, check_schema; check_schema({'type': 'object'}, Limits())"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve.errors import APIError

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted (uploads aside); far above any prompt that fits the context."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. Generous for honest clients (OpenAI's own limits fit inside)."""

    max_prompts: int = 64
    """Prompts in one /v1/completions request (`prompt` as a list)."""
    max_choices: int = 128
    """Rows one request may start: prompts x `n`."""
    max_messages: int = 2048
    """Messages in one chat request (OpenAI's limit too)."""
    max_chars_per_token: int = 32
    """The cheap length check: a prompt of more characters than the context times this
    cannot fit (no tokenizer packs that many into one token), so it is refused unrendered."""
    max_schema_nodes: int = 100_000
    """JSON values in a response_format schema (OpenAI: at most 5,000 properties, 1,000
    enum values, 15,000 enum characters; such a schema has far fewer nodes)."""
    max_schema_depth: int = 64
    """Nesting of a response_format schema, in JSON levels (OpenAI's 10 object levels are
    about 20-30 JSON levels)."""
    max_adapters: int = 64
    """Adapters served under names of the operator's or the clients' choosing (--adapter and
    POST /v1/adapters; the `ft:` models jobs publish aside): each holds memory until DELETEd."""
    max_running_graders: int = 4
    """Grader runs at once, each in its own thread (a python grader's child, a judge's call);
    they never take the threads that chats render in."""
    max_waiting_graders: int = 16
    """Grader runs waiting for one of those; more are refused with 429 `server_overloaded`."""
    grader_run_s: float = 120.0
    """Wall-clock time for one run's python graders together (OpenAI's limit for one): a multi
    of 32 graders that spin held its thread, and a core, for 64 minutes."""


def check_prompts(n_prompts: int, n: int, limits: Limits) -> None:
    if n_prompts > limits.max_prompts:
        raise APIError(400, f"'prompt' has {n_prompts} prompts; this server takes at most {limits.max_prompts} per "
                            "request: split them over several requests", param="prompt", code="too_many_prompts")
    if n_prompts * n > limits.max_choices:
        raise APIError(400, f"{n_prompts} prompts x n={n} is {n_prompts * n} completions; this server makes at most "
                            f"{limits.max_choices} per request: lower n or split the prompts",
                       param="n", code="too_many_choices")


def check_adapters(loaded: int, limits: Limits) -> None:
    if loaded >= limits.max_adapters:
        raise APIError(400, f"this server already serves {loaded} adapters, its limit (--max-adapters "
                            f"{limits.max_adapters}); DELETE /v1/adapters/NAME one you no longer need first",
                       param="name", code="too_many_adapters")


def check_messages(n_messages: int, limits: Limits) -> None:
    if n_messages > limits.max_messages:
        raise APIError(400, f"'messages' has {n_messages} messages; this server takes at most {limits.max_messages}",
                       param="messages", code="too_many_messages")


def check_length(texts: Sequence[str], max_context: int, param: str, limits: Limits) -> None:
    """Refuse, before any rendering or tokenizing, text that cannot fit the context."""
    chars = sum(len(t) for t in texts)
    if chars > max_context * limits.max_chars_per_token:
        raise APIError(400, f"'{param}' is {chars:,} characters, far more than the model's context of {max_context} "
                            "tokens can hold; shorten it", param=param, code="context_length_exceeded")


def check_message_tokens(roles: Sequence[str], per_role: dict[str, int], max_context: int) -> None:
    """Refuse, before rendering, a conversation whose messages alone (each at least what the
    template wraps it in, `Engine.message_tokens`) cannot fit the context."""
    floor = sum(per_role.get(r, 0) for r in roles)
    if floor > max_context:
        raise APIError(400, f"the {len(roles)} messages take at least {floor:,} tokens, more than the model's context "
                            f"of {max_context}; send fewer", param="messages", code="context_length_exceeded")


def check_schema(schema: Any, limits: Limits, param: str = "response_format.json_schema.schema") -> None:
    """Refuse a schema with more than max_schema_nodes values or nested deeper than
    max_schema_depth, walking the raw dict without recursion (so depth itself is safe)."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > limits.max_schema_depth:
            raise APIError(400, f"the schema is nested more than {limits.max_schema_depth} levels deep; flatten it",
                           param=param, code="schema_too_deep")
        if nodes > limits.max_schema_nodes:
            raise APIError(400, f"the schema has more than {limits.max_schema_nodes:,} values; make it smaller",
                           param=param, code="schema_too_large")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


# ----------------------------------------------------------------------------- body size


class BodyLimit:
    """ASGI middleware: refuse bodies over max_bytes (by Content-Length, or while streaming)."""

    # File uploads are larger than any inference request; the files API enforces its own
    # (configurable) limit while streaming them to disk.
    EXEMPT_PREFIXES = ("/v1/files",)

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.EXEMPT_PREFIXES):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, too_large.message)
            return message

        await self.app(scope, limited_receive, send)


# ----------------------------------------------------------------------------- paths from clients


def confined_path(path: str, roots: Sequence[Path], param: str, what: str) -> Path:
    """The real path of a client-named file or folder, if it exists under one of `roots`
    ($TUNESMITH_HOME and the server's --allow-path folders), after every symlink and '..'.
    Otherwise one 400 for both "missing" and "not allowed", so a client cannot learn
    which paths exist on the server."""
    try:
        real = Path(os.path.realpath(Path(path).expanduser()))
        allowed = any(real.is_relative_to(Path(os.path.realpath(r))) for r in roots) and real.exists()
    except (OSError, ValueError):  # a NUL byte, a name too long: no such path either
        allowed = False
    if not allowed:
        raise APIError(400, f"no {what} at '{path}' that this server may load (it is missing or outside the folders "
                            "the server allows: $TUNESMITH_HOME and its --allow-path folders)",
                       param=param, code="path_not_allowed")
    return real


def looks_like_path(spec: str) -> bool:
    """Whether a model spec names a path rather than a registry name or an `ft:` model."""
    return not spec.startswith("ft:") and ("/" in spec or os.sep in spec)
