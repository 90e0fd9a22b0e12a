"""A teacher: any OpenAI-compatible chat endpoint, asked through the official `openai` client.

Retries are ours, not the client's (it is built with `max_retries=0`), so that every
attempt is counted and the last error is what a failed prompt records: 429, 408, 409 and
5xx answers, timeouts and connection errors are retried with exponential backoff and
jitter (a `Retry-After` header is honoured, up to a minute); any other answer (400, 401,
404 ...) fails the prompt at once, since asking again cannot change it.

    python -c "from tunesmith.generate.remote import backoff_s; print([round(backoff_s(a), 2) for a in range(5)])"
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
RETRY_STATUS = (408, 409, 429)


@dataclass
class Reply:
    """The teacher's answers to one request, with what it cost."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    """Seconds of the successful attempt (waits between retries are not counted)."""
    attempts: int


class TeacherFailure(Exception):
    """A request that failed for good: its last error and how many attempts were made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


def build_client(base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
    """An AsyncOpenAI client without its own retries.

    api_key None: the client reads OPENAI_API_KEY; when that is unset too, a placeholder
    is sent (local servers such as `tunesmith serve` without --api-key accept anything)."""
    from openai import AsyncOpenAI, OpenAIError

    try:
        return AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    except OpenAIError:  # no key anywhere
        return AsyncOpenAI(base_url=base_url, api_key="no-key", max_retries=0, timeout=timeout_s)


def backoff_s(attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None,
              base_s: float = BACKOFF_BASE_S) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): base * 2^attempt capped,
    times a jitter factor in [0.5, 1) so that concurrent requests spread out."""
    delay = min(BACKOFF_CAP_S, base_s * 2**attempt) * (0.5 + 0.5 * (rng or random).random())
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_CAP_S))
    return delay


async def ask(
    client: Any,
    model: str,
    messages: Sequence[dict[str, Any]],
    n: int = 1,
    temperature: float | None = None,
    max_tokens: int | None = None,
    max_retries: int = 5,
    secret: str | None = None,
    backoff_base_s: float = BACKOFF_BASE_S,
    fields: dict[str, Any] | None = None,
) -> Reply:
    """One chat completion with `n` answers, retried on transient errors.

    secret: a string (the API key) scrubbed from any error message kept. fields: more
    arguments for the client (a constraint's `request_fields()`)."""
    import openai

    params: dict[str, Any] = {"model": model, "messages": list(messages), "n": n}
    params.update(fields or {})
    if temperature is not None:
        params["temperature"] = temperature
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    attempt = 0
    while True:
        attempt += 1
        retry_after = None
        t0 = time.perf_counter()
        try:
            resp = await client.chat.completions.create(**params)
            return _reply(resp, n, time.perf_counter() - t0, attempt)
        except openai.APIStatusError as exc:
            error = _scrub(f"HTTP {exc.status_code}: {_short(exc)}", secret)
            if exc.status_code not in RETRY_STATUS and exc.status_code < 500:
                raise TeacherFailure(error, attempt) from None
            retry_after = _retry_after(exc)
        except openai.APITimeoutError:
            error = f"no answer within the timeout ({client.timeout} s)"
        except openai.APIConnectionError as exc:
            error = _scrub(f"connection failed: {exc.__cause__ or exc}", secret)
        except _BadReply as exc:
            raise TeacherFailure(str(exc), attempt) from None
        if attempt > max_retries:
            raise TeacherFailure(f"{error} (gave up after {attempt} attempts)", attempt)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # httpx can turn a cancellation that lands mid-connect into a connection error
            # (encode/httpx#2381): asking again would outlive the Ctrl-C that cancelled us.
            raise asyncio.CancelledError()
        await asyncio.sleep(backoff_s(attempt - 1, retry_after, base_s=backoff_base_s))


class _BadReply(Exception):
    pass


def _reply(resp: Any, n: int, latency_s: float, attempts: int) -> Reply:
    choices = sorted(resp.choices or [], key=lambda c: c.index)
    if len(choices) != n:
        raise _BadReply(f"asked for {n} answer(s), the teacher returned {len(choices)}")
    texts = [c.message.content for c in choices]
    if any(t is None for t in texts):
        raise _BadReply("the teacher returned an answer without text content (a tool call or a refusal)")
    usage = resp.usage
    return Reply(
        texts=texts,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        latency_s=latency_s,
        attempts=attempts,
    )


def _short(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
    return str(getattr(exc, "message", exc))[:300]


def _retry_after(exc: Any) -> float | None:
    try:
        return float(exc.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


async def gather_interruptible(*coros: Any) -> list[Any]:
    """asyncio.gather of `coros`, where Ctrl-C cancels every one of them at once and, once
    they have stopped, raises KeyboardInterrupt.

    asyncio.run's own Ctrl-C handling cancels only its main task and relies on that
    cancellation reaching each request through gather and the HTTP stack. Here the handler
    is installed with `loop.add_signal_handler`, which wakes the loop through its wakeup fd
    whichever thread the signal lands on, and it cancels each task directly. A second
    Ctrl-C is Python's default (KeyboardInterrupt at once). Outside the main thread (a
    Jupyter kernel's loop in another thread) this is a plain gather."""
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(c) for c in coros]
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        loop.remove_signal_handler(signal.SIGINT)
        for task in tasks:
            task.cancel()

    installed = False
    if threading.current_thread() is threading.main_thread():
        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # Windows' loop, an embedded interpreter
            pass
    try:
        return await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if installed and not interrupted:
            loop.remove_signal_handler(signal.SIGINT)


def run_coroutine(coro):
    """asyncio.run, also where this thread already runs an event loop (Jupyter, or a test
    session that drives a browser with Playwright's sync API): then in a thread of its own."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
