"""The engine in a child process, behind the same Engine interface as LocalEngine.

`tunesmith serve` runs its engine here by default, so that the HTTP side cannot starve it:
in one process the event loop (parsing bodies, validating them, streaming) and the engine's
scheduler share one interpreter lock, and under a flood of requests the loop held it in
79% of samples against the engine's 17% (py-spy, docs/benchmarks.md). In its own process
the engine has its own lock and the operating system shares the cores between the two.

The parent keeps what the HTTP side asks for without waiting: the tokenizer (rendering,
encoding and length checks stay in the server process), the served model names (every
adapter change goes through here), and a bound on the rows not yet finished. Submitting
and cancelling are one message each, never a round trip; the child sends each step's
events as one message. Adapters, compiles and stats are calls answered by the child.
If the child dies, every open request ends with an "error" event and later calls fail
with a message that says so.

    python -c "from tunesmith.generate.process import ProcessEngine; \
e = ProcessEngine('smollm2-135m-instruct'); print([c.id for c in e.models()], e.stats()); e.close()"
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith.errors import TunesmithError, UsageError
from tunesmith.generate.constraints import Constraint
from tunesmith.generate.engine import MAX_BATCH_ROWS, MAX_WAITING_ROWS, LocalEngine, chat_prompt
from tunesmith.generate.requests import (
    EngineOverloaded,
    EngineStopped,
    Event,
    Handle,
    ModelCard,
    SamplingParams,
    UnknownModelError,
)
from tunesmith.models.inference import load_for_inference

log = logging.getLogger("tunesmith.generate")

CALL_TIMEOUT_S = 600.0
"""The longest a call into the child may take (loading a big adapter from slow storage)."""
START_TIMEOUT_S = 900.0
"""The longest the child may take to load the model before the server gives up."""


class _Handle(Handle):
    def __init__(self, engine: "ProcessEngine", rid: int) -> None:
        super().__init__()
        self._engine, self._rid = engine, rid

    def cancel(self) -> None:
        """As LocalEngine's: no event follows (the row is dropped at the next step)."""
        if not self.cancelled:
            self.cancelled = True
            with self._engine._lock:
                self._engine._open.pop(self._rid, None)
            self._engine._send(("cancel", self._rid), quiet=True)


class ProcessEngine:
    """`LocalEngine.load(model, adapters, ...)` run in a spawned child, `threads` torch threads there."""

    def __init__(self, model: str, adapters: Sequence[tuple[str, str | Path]] = (), home: Path | None = None,
                 precision: str = "auto", weights: str = "fp32", threads: int | None = None,
                 max_batch_rows: int = MAX_BATCH_ROWS, max_waiting_rows: int = MAX_WAITING_ROWS):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        spec = {"model": model, "adapters": [(n, str(p)) for n, p in adapters], "home": home,
                "precision": precision, "weights": weights, "threads": threads,
                "max_batch_rows": max_batch_rows, "max_waiting_rows": max_waiting_rows,
                "log_level": logging.getLogger("tunesmith").getEffectiveLevel()}
        self._proc = ctx.Process(target=_child_main, args=(child_end, spec), name="tunesmith-engine", daemon=True)
        self._proc.start()
        child_end.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        """Guards the open requests, the pending calls and the model cards."""
        self._open: dict[int, tuple[Callable[[Event], None], Any]] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._max_open = max_batch_rows + max_waiting_rows
        self._stopped: str | None = None
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise EngineStopped(f"the engine process did not load {model} within {START_TIMEOUT_S:.0f} s")
        try:
            kind, info = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineStopped(f"the engine process exited (code {self._proc.exitcode}) while loading {model}; "
                                "see its log above") from None
        if kind == "failed":
            self._proc.join(10)
            raise info
        self.base_id: str = info["base_id"]
        self.max_context: int = info["max_context"]
        self.message_tokens: dict[str, int] = info["message_tokens"]
        self.tool_syntax = info["tool_syntax"]
        self.precision: str = info["precision"]
        self._tok = info["tokenizer"]
        self._cards: dict[str, ModelCard] = {c.id: c for c in info["models"]}
        self.pid: int = self._proc.pid
        self._reader = threading.Thread(target=self._read, name="tunesmith-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ answered here

    def models(self) -> list[ModelCard]:
        with self._lock:
            base = self._cards[self.base_id]
            return [base] + [c for n, c in sorted(self._cards.items()) if n != self.base_id]

    def has_model(self, model: str) -> bool:
        with self._lock:
            return model in self._cards

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        return chat_prompt(self._tok, messages, tools)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def submit(
        self, prompt_ids: list[int], model: str, params: SamplingParams, on_event: Callable[[Event], None],
        group: Any = None,
    ) -> Handle:
        """As LocalEngine.submit: the model and the prompt are checked here, and EngineOverloaded
        comes when max_batch_rows + max_waiting_rows rows are already unfinished."""
        if not self.has_model(model):
            served = ", ".join(c.id for c in self.models())
            raise UnknownModelError(f"model '{model}' is not served here; available: {served}")
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        rid = next(self._ids)
        handle = _Handle(self, rid)
        with self._lock:
            self._check_running()
            if len(self._open) >= self._max_open:
                raise EngineOverloaded(f"the server is overloaded: {len(self._open)} requests are generating or "
                                       "waiting for a place in the batch; retry shortly")
            # The group object is kept until the row ends, so its id names one request in the child.
            self._open[rid] = (on_event, group)
        self._send(("submit", rid, list(prompt_ids), model, params, id(group) if group is not None else None))
        return handle

    # ------------------------------------------------------------------ answered by the child

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def compile(self, constraint: Constraint) -> None:
        """Compile in the child (which keeps it for the rows that use it); a ConstraintError
        says what cannot be honoured. Nothing comes back: the compiled matcher stays there."""
        self._call("compile", constraint)

    def add_adapter(self, name: str, path: str | Path) -> ModelCard:
        card = self._call("add_adapter", name, str(path))
        with self._lock:
            self._cards[card.id] = card
        return card

    def remove_adapter(self, name: str) -> None:
        self._call("remove_adapter", name)
        with self._lock:
            self._cards.pop(name, None)

    def close(self) -> None:
        self._send(("close",), quiet=True)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    # ------------------------------------------------------------------ plumbing

    def _check_running(self) -> None:
        if self._stopped:
            raise EngineStopped(self._stopped)

    def _send(self, msg: tuple, quiet: bool = False) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):
            if not quiet:
                self._check_running()
                raise EngineStopped("the engine process is gone; restart the server") from None

    def _call(self, method: str, *args: Any) -> Any:
        cid = next(self._ids)
        fut: Future = Future()
        with self._lock:
            self._check_running()
            self._calls[cid] = fut
        self._send(("call", cid, method, args))
        return fut.result(CALL_TIMEOUT_S)

    def _read(self) -> None:
        """The reader thread: hands each event to its request's callback, each answer to its call."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "events":
                for rid, ev in msg[1]:
                    with self._lock:
                        entry = self._open.pop(rid, None) if ev.finish_reason else self._open.get(rid)
                    if entry is not None:
                        entry[0](ev)
            elif msg[0] == "reply":
                _, cid, ok, value = msg
                with self._lock:
                    fut = self._calls.pop(cid, None)
                if fut is not None:
                    fut.set_result(value) if ok else fut.set_exception(value)
        self._proc.join(5)
        code = self._proc.exitcode
        with self._lock:
            self._stopped = (f"the engine process exited (code {code}); restart the server" if code
                             else "the engine is shut down")
            opened, self._open = list(self._open.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        if code:
            log.error("the engine process exited with code %s; %d open request(s) fail", code, len(opened))
        for on_event, _ in opened:
            on_event(Event("", "error"))
        for fut in calls:
            fut.set_exception(EngineStopped(self._stopped))


# ----------------------------------------------------------------------------- the child


def _child_main(conn: Any, spec: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent shuts us down
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tunesmith").setLevel(spec["log_level"])
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        # The parent bounds the rows not yet finished; here they may all be waiting at once.
        engine = LocalEngine(load_for_inference(spec["model"], home=spec["home"], weights=spec["weights"]),
                             spec["precision"], max_batch_rows=spec["max_batch_rows"],
                             max_waiting_rows=spec["max_batch_rows"] + spec["max_waiting_rows"])
        try:
            for name, path in spec["adapters"]:
                engine.add_adapter(name, path)
        except BaseException:
            engine.close()
            raise
    except Exception as exc:
        conn.send(("failed", _sendable(exc)))
        return
    conn.send(("ready", {"base_id": engine.base_id, "max_context": engine.max_context,
                         "message_tokens": engine.message_tokens, "tool_syntax": engine.tool_syntax,
                         "precision": engine.precision, "tokenizer": engine.tokenizer, "models": engine.models()}))
    _Child(conn, engine).run()


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when it crosses the pipe intact, else a TunesmithError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TunesmithError(f"{type(exc).__name__}: {exc}")


class _Child:
    def __init__(self, conn: Any, engine: Any) -> None:
        self.conn, self.engine = conn, engine
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.rows: dict[int, list] = {}
        """Per row not ended: [its group id (None: no group), its Handle once submitted]."""
        self.groups: dict[int, list] = {}
        """Per request id of the parent's: [the one object its rows share as their group, rows not ended]."""
        self.lock = threading.Lock()
        self.calls = ThreadPoolExecutor(2, thread_name_prefix="tunesmith-engine-call")

    def run(self) -> None:
        sender = threading.Thread(target=self._send_loop, name="tunesmith-engine-sender", daemon=True)
        sender.start()
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):  # the parent is gone
                    break
                if msg[0] == "submit":
                    self._submit(*msg[1:])
                elif msg[0] == "cancel":
                    with self.lock:
                        row = self._end(msg[1])
                    if row is not None and row[1] is not None:
                        row[1].cancel()
                elif msg[0] == "call":
                    self.calls.submit(self._answer, *msg[1:])
                elif msg[0] == "close":
                    break
        finally:
            self.engine.close()
            self.calls.shutdown(wait=True)
            self.out.put(None)
            sender.join(10)

    def _end(self, rid: int) -> list | None:
        """Forget a row that ended or was cancelled (call with the lock held; once is enough);
        what was kept of it, None when it was already forgotten."""
        row = self.rows.pop(rid, None)
        group = self.groups.get(row[0]) if row is not None and row[0] is not None else None
        if group is not None:
            group[1] -= 1
            if not group[1]:
                del self.groups[row[0]]
        return row

    def _submit(self, rid: int, prompt_ids: list[int], model: str, params: SamplingParams, gid: int | None) -> None:
        with self.lock:
            group = None
            if gid is not None:
                group = self.groups.setdefault(gid, [object(), 0])
                group[1] += 1
            self.rows[rid] = [gid, None]

        def on_event(ev: Event) -> None:  # the engine thread: hand over and go on
            self.out.put((rid, ev))
            if ev.finish_reason:
                with self.lock:
                    self._end(rid)

        try:
            handle = self.engine.submit(prompt_ids, model, params, on_event, group=group[0] if group else None)
        except Exception as exc:  # the parent checked the model and the bound; this is a race (a removal)
            log.warning("request %d refused by the engine: %s", rid, exc)
            on_event(Event("", "error", len(prompt_ids), 0))
            return
        with self.lock:
            if rid in self.rows:  # not ended or cancelled meanwhile
                self.rows[rid][1] = handle

    def _answer(self, cid: int, method: str, args: tuple) -> None:
        try:
            value = getattr(self.engine, method)(*args)
            reply = ("reply", cid, True, None if method == "compile" else value)
        except Exception as exc:
            reply = ("reply", cid, False, _sendable(exc))
        self.out.put(reply)

    def _send_loop(self) -> None:
        """One message per burst: every event queued since the last send goes together."""
        done = False
        while not done:
            batch = [self.out.get()]
            while True:
                try:
                    batch.append(self.out.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                done = True
                batch = [b for b in batch if b is not None]
            events = [b for b in batch if b[0] != "reply"]
            try:
                if events:
                    self.conn.send(("events", events))
                for r in batch:
                    if r[0] == "reply":
                        self.conn.send(r)
            except (OSError, ValueError):
                return
