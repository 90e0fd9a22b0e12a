"""The inference engine every caller uses: one base model, many LoRA adapters, dynamic batching.

One scheduler thread owns the model. Every loop it (1) prefills the requests that arrived
since the last step, together, into a fresh KV cache and samples their first token, (2)
merges that cache into the running batch (left padding, so every row's newest token is in
the last column), and (3) runs one decode step for all running rows at once, each row with
its own adapter (peft's `adapter_names`, "__base__" for the bare model). So a new request
waits at most one decode step of the others before its prefill, never for them to finish.

The server streams single requests through `submit`; evaluation calls `generate_batch`,
greedy at temperature 0, which submits every row and waits: rows that share a long
beginning (a system prompt with a label list, few-shot examples) prefill it once and start
from copies of its KV cache, and rows prefilled together with the same whole prompt (n
choices, reinforcement's group of answers) compute it once. Every forward runs at the one precision rule of
`models.inference` (auto: bf16 autocast where the hardware is fast at it). What callers
pass and get back (SamplingParams, Event, Completion, ...) is in generate/requests.py.

    python -c "from tunesmith.generate.engine import LocalEngine, SamplingParams; \
e = LocalEngine.load('smollm2-135m-instruct'); \
print(e.generate(e.render_chat([{'role': 'user', 'content': 'Hi'}]), e.base_id, SamplingParams(32, 0.0)))"
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from tunesmith.data.example import Message
from tunesmith.data.render import end_of_turn_ids, render_prompt, tokens_per_message
from tunesmith.data.tool_format import tool_syntax
from tunesmith.data.tool_syntax import ToolSyntax
from tunesmith.errors import TunesmithError, UsageError
from tunesmith.generate import batch
from tunesmith.generate.constraints import Constraint, ConstraintError
from tunesmith.generate.requests import (
    AdapterConflictError,
    Completion,
    EngineOverloaded,
    Event,
    Handle,
    ModelCard,
    SamplingParams,
    UnknownModelError,
)
from tunesmith.models.adapters import adapter_meta, check_shapes
from tunesmith.models.inference import (
    LoadedModel,
    autocast,
    find_adapter,
    load_for_inference,
    pad_id,
    put_adapter,
    resolve_precision,
)
from tunesmith.models.registry import transformers_names

log = logging.getLogger("tunesmith.generate")

BASE_ROW = "__base__"
"""peft's adapter name for a row that uses the bare base model."""
COMPILED_CACHE = 64
"""Compiled constraints kept for reuse (a client sending the same schema pays one compile)."""
MAX_BATCH_ROWS = 32
"""Rows decoded together by default; more requests wait in the queue."""
MAX_BATCH_TOKENS = 65_536
"""Token budget of one step: rows decoded together times the longest row's prompt plus
max_tokens (the KV cache is left-padded to it), so 32 long prompts cannot exhaust memory.
A row alone is always admitted (its length is bounded by the context)."""
MAX_WAITING_ROWS = 512
"""Rows `submit` lets wait for a place in the batch; beyond, EngineOverloaded (the server's 429)."""
MIN_TEMPERATURE = 1e-4
"""Below it a row samples greedily, the limit as the temperature goes to 0: dividing the
logits by less can overflow them, and the probabilities would be NaN."""
# ":" is allowed so fine-tuning jobs can serve their models as ft:<base>:<suffix>:<id>, and
# "." for names such as Qwen2.5-0.5B-Instruct or a suffix v1.2.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:.-]{0,127}$")
"""An adapter's public name; peft knows it by _peft_name."""


def _peft_name(name: str) -> str:
    """The name peft keeps an adapter under: torch's ModuleDict keys cannot hold '.', so it
    becomes '~', a character public names never have (the mapping stays one to one)."""
    return name.replace(".", "~")


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]],
                tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """The prompt for a conversation (and the tools it may call) as API clients send it:
    exactly training's tokens plus the generation prompt."""
    msgs = [Message(m["role"], m.get("content") or "", name=m.get("name"), tool_calls=m.get("tool_calls"))
            for m in messages]
    return render_prompt(tokenizer, msgs, list(tools) if tools else None)


class Engine(Protocol):
    """What the HTTP app and the terminal chat need from an engine."""

    base_id: str
    max_context: int
    message_tokens: dict[str, int]
    tool_syntax: ToolSyntax

    def models(self) -> list[ModelCard]: ...
    def stats(self) -> dict[str, int]: ...
    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def compile(self, constraint: Constraint) -> Any: ...
    def submit(
        self, prompt_ids: list[int], model: str, params: SamplingParams, on_event: Callable[[Event], None],
        group: Any = None,
    ) -> "Handle": ...
    def add_adapter(self, name: str, path: str | Path) -> ModelCard: ...
    def remove_adapter(self, name: str) -> None: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class _Prefix:
    """Leading tokens shared by the rows of one `generate_batch`, prefilled once."""

    ids: list[int]
    cache: Any = None
    """Its KV cache, computed by the engine thread when the first of its rows is prefilled."""


@dataclass
class _Seq:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    handle: Handle
    generator: Any = None
    out_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    n_cached: int = 0
    """Tokens of this row held in the KV cache (its next position id)."""
    done: bool = False
    matcher: Any = None
    """A constrained row's llguidance LLMatcher: which tokens may come next."""
    prefix: _Prefix | None = None
    evicted: bool = False
    """Taken out of the batch for a fairer share (see _admit): it leaves at the next step and
    waits again; readmitted, it prefills its prompt and its answer so far."""
    group: Any = None
    """The request this row belongs to (its n choices, its prompts): admission takes rows
    from the waiting requests in turn, so one big request cannot starve small ones."""


class LocalEngine:
    """The one real Engine: a transformers model (+ peft adapters) in this process.

    precision: every forward's precision (models.inference's rule; auto: bf16 autocast where
    fast). max_batch_rows: the most rows decoded together in one step; max_batch_tokens: their
    token budget (MAX_BATCH_TOKENS); max_waiting_rows: the rows `submit` queues before
    refusing more (`generate_batch`, a caller's own batch, is not bounded)."""

    def __init__(self, loaded: LoadedModel, precision: str = "auto", max_batch_rows: int = MAX_BATCH_ROWS,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, max_waiting_rows: int = MAX_WAITING_ROWS):
        import torch

        if max_batch_rows < 1:
            raise UsageError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        self.base_id = loaded.base_id
        self.max_context = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        self._device = next(loaded.model.parameters()).device
        self.precision = resolve_precision(precision, self._device.type)
        self._max_rows = max_batch_rows
        self._max_tokens = max_batch_tokens
        self._max_waiting = max_waiting_rows
        # A LoadedModel with an adapter arrives as a PeftModel: its adapters are served as loaded.
        self._peft: Any = loaded.model if hasattr(loaded.model, "peft_config") else None
        self._base = loaded.model.get_base_model() if self._peft is not None else loaded.model.eval()
        self._activated: str | None = None
        """The adapter the one-model fast path last set active (see _forward)."""
        self._config = self._base.config
        self._tok = loaded.tokenizer
        self._identity = loaded.base_identity
        self._eot = set(end_of_turn_ids(loaded.tokenizer))
        self.message_tokens = tokens_per_message(loaded.tokenizer)
        """Per role, the fewest tokens a message adds to a prompt (the server's cheap length check)."""
        self.tool_syntax = tool_syntax(loaded.tokenizer)
        """How the model writes a tool call: its chat template's syntax, or the default."""
        self._pad_id = pad_id(loaded.tokenizer)
        self._created = int(time.time())
        self._adapters: dict[str, ModelCard] = {
            name: ModelCard(name, self._created, parent=self.base_id, path=str(loaded.adapter))
            for name in (self._peft.peft_config if self._peft is not None else ())
        }
        self._draining: set[str] = set()
        # _model_lock: held for a whole step and for adapter changes (peft mutates layers).
        # _queue_cv: guards the waiting list; the loop sleeps on it when idle.
        self._model_lock = threading.RLock()
        self._queue_cv = threading.Condition()
        self._waiting: list[_Seq] = []
        self._turns = 0
        self._last_turn: dict[Any, int] = {}
        """Per waiting request, when it last had a row admitted (fair admission, see _admit)."""
        self._rows: list[_Seq] = []
        self._joining: list[_Seq] = []
        """Rows taken from the queue this step, until the prefill puts them in the batch: stats
        count them as running, so a long prefill never reads as an idle engine."""
        self._cache: Any = None
        self._mask: Any = None
        self._next_ids: Any = None
        self._closed = False
        self._peak_rows = 0
        self._steps = 0
        self._cancelled = 0
        self._preempted = 0
        self._torch = torch
        self._ll_tokenizer: Any = None
        self._compiled: dict[Constraint, Any] = {}
        self._compile_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model: str, adapters: Sequence[tuple[str, str | Path]] = (), home: Path | None = None,
             precision: str = "auto", weights: str = "fp32") -> "LocalEngine":
        """An engine on `load_for_inference(model, weights=weights)`, with each (name, path) adapter added."""
        engine = cls(load_for_inference(model, home=home, weights=weights), precision)
        try:
            for name, path in adapters:
                engine.add_adapter(name, path)
        except BaseException:
            engine.close()
            raise
        return engine

    # ------------------------------------------------------------------ models and prompts

    def models(self) -> list[ModelCard]:
        base = ModelCard(self.base_id, self._created)
        return [base] + [c for n, c in sorted(self._adapters.items()) if n not in self._draining]

    def has_model(self, model: str) -> bool:
        return model == self.base_id or (model in self._adapters and model not in self._draining)

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The prompt for a conversation (and the tools it may call): exactly training's tokens
        plus the generation prompt."""
        return chat_prompt(self._tok, messages, tools)

    def stats(self) -> dict[str, int]:
        """Rows generating now, requests queued, the most rows ever decoded together, decode
        steps run, requests cancelled before their end (clients that went away), and rows
        taken out of the batch to give other requests their share (see _admit)."""
        with self._queue_cv:
            running = {id(s) for s in self._rows} | {id(s) for s in self._joining if not s.done}
            return {"running": len(running), "waiting": len(self._waiting),
                    "peak_rows": self._peak_rows, "steps": self._steps, "cancelled": self._cancelled,
                    "preempted": self._preempted}

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    @property
    def tokenizer(self) -> Any:
        return self._tok

    # ------------------------------------------------------------------ constraints

    def compile(self, constraint: Constraint) -> Any:
        """The llguidance matcher of a constraint, compiled once and kept (COMPILED_CACHE);
        each row runs a copy. A ConstraintError says what cannot be honoured. Call it off
        an event loop: a big schema takes up to about a second (docs/serving.md)."""
        import llguidance

        with self._compile_lock:
            if constraint in self._compiled:
                return self._compiled[constraint]
            if self._ll_tokenizer is None:  # about 0.7 s for a 49k vocabulary: only when first needed
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tok, n_vocab=self._vocab_size(), eos_token=sorted(self._eot))
        try:
            grammar = constraint.grammar()
        except ValueError as exc:
            raise ConstraintError(f"the {constraint.kind} cannot be read: {exc}") from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the {constraint.kind} cannot be honoured: {matcher.get_error().strip()}")
        with self._compile_lock:
            while len(self._compiled) >= COMPILED_CACHE:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[constraint] = matcher
        return matcher

    def _vocab_size(self) -> int:
        out = self._base.get_output_embeddings()
        return int(out.weight.shape[0]) if out is not None else len(self._tok)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str | Path) -> ModelCard:
        """Load a LoRA adapter (run dir or adapter dir) onto the shared base, servable at once."""
        if not ADAPTER_NAME.match(name or ""):
            raise UsageError(
                f"adapter name '{name}' is not allowed; use 1-128 letters, digits, '_', '-', '.' or ':', "
                "starting with a letter or digit"
            )
        if name in "lora_":  # peft matches adapter names inside parameter names: "a" would hit "lora_A"
            raise UsageError(f"adapter name '{name}' clashes with peft's parameter names; choose a longer name")
        if name == self.base_id or name == BASE_ROW:
            raise AdapterConflictError(f"adapter name '{name}' is the base model's id; choose another name")
        adapter_dir = find_adapter(path, self._identity)
        check_shapes(adapter_dir, self._config)  # before peft allocates the adapter's weights
        with self._model_lock:
            if name in self._adapters:
                state = "still finishing requests after removal" if name in self._draining else "already loaded"
                raise AdapterConflictError(
                    f"adapter '{name}' is {state}; remove it first or choose another name"
                )
            self._peft = put_adapter(self._peft if self._peft is not None else self._base, adapter_dir, _peft_name(name),
                                     self.base_id)
            self._keep_active_adapter_valid()
            card = ModelCard(name, int(time.time()), parent=self.base_id, path=str(adapter_dir))
            self._adapters[name] = card
        log.info("adapter %s loaded from %s", name, adapter_dir)
        if adapter_meta(adapter_dir).get("base_quantization"):
            # Common practice, and what `tunesmith export --merge-base original` writes; the run's
            # own metrics were measured on the NF4 base (export's default merge reproduces those).
            log.info("adapter %s was trained on an NF4-quantized base (QLoRA); it is served on the "
                     "full-precision base", name)
        return card

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter now; its weights go once its running requests finish."""
        with self._model_lock:
            if name not in self._adapters or name in self._draining:
                raise UnknownModelError(f"no adapter named '{name}' is loaded; loaded: {self._adapter_list()}")
            self._draining.add(name)
            self._delete_drained()

    def _adapter_list(self) -> str:
        names = [n for n in sorted(self._adapters) if n not in self._draining]
        return ", ".join(names) or "none"

    def _delete_drained(self) -> None:
        with self._queue_cv:
            in_use = {s.adapter for s in self._rows} | {s.adapter for s in self._waiting}
        for name in sorted(self._draining - in_use):
            self._peft.delete_adapter(_peft_name(name))
            del self._adapters[name]
            self._draining.discard(name)
            log.info("adapter %s removed", name)
        self._keep_active_adapter_valid()

    def _keep_active_adapter_valid(self) -> None:
        # peft keeps pointing at a deleted "active" adapter once the last one is gone, and
        # its forward looks that name up even when adapter_names picks each row's adapter.
        # Its note of the active adapter can then name one its layers do not run (the last
        # adapter removed and added back), so the one-model fast path forgets what it set.
        self._activated = None
        if self._peft is not None and self._peft.peft_config and self._peft.active_adapter not in self._peft.peft_config:
            self._peft.set_adapter(next(iter(self._peft.peft_config)), inference_mode=True)

    # ------------------------------------------------------------------ requests

    def submit(
        self, prompt_ids: list[int], model: str, params: SamplingParams, on_event: Callable[[Event], None],
        group: Any = None,
    ) -> Handle:
        """Queue one generation; `on_event` is called from the engine thread, keep it quick.
        Rows submitted with the same `group` (one HTTP request's) share one turn in admission.
        EngineOverloaded when max_waiting_rows rows already wait."""
        template = self.compile(params.constraint) if params.constraint is not None else None
        seq = self._new_seq(prompt_ids, model, params, on_event, template)
        seq.group = group
        self._enqueue([seq], bounded=True)
        return seq.handle

    def generate_batch(
        self, prompt_ids: Sequence[list[int]], model: str, params: SamplingParams,
        on_done: Callable[[int], None] | None = None, seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Generate every prompt with `params` and wait for all (eval's greedy batch is this
        at temperature 0); results in the prompts' order. `seeds`: one sampling seed per
        prompt (reproducible rows that differ from each other, e.g. a group of answers to
        the same prompt), instead of params.seed for all.

        Rows are queued shortest first, so rows decoded together need little padding; when
        all share at least MIN_SHARED_PREFIX leading tokens, those are prefilled once and each
        row starts from a copy of their KV cache. `on_done(i)` is called in this thread as
        row i finishes (progress)."""
        if not prompt_ids:
            return []
        t0 = time.perf_counter()
        common = batch.shared_prefix(prompt_ids) if len(prompt_ids) > 1 else []
        prefix = _Prefix(common) if len(common) >= batch.MIN_SHARED_PREFIX else None
        template = self.compile(params.constraint) if params.constraint is not None else None
        finished: queue.Queue[tuple[int, Event]] = queue.Queue()
        parts: list[list[str]] = [[] for _ in prompt_ids]

        def collect(i: int) -> Callable[[Event], None]:
            def on_event(ev: Event) -> None:  # engine thread: only append and hand over
                parts[i].append(ev.text)
                if ev.finish_reason:
                    finished.put((i, ev))
            return on_event

        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        row_params = ([dataclasses.replace(params, seed=seeds[i]) for i in range(len(prompt_ids))] if seeds is not None
                      else [params] * len(prompt_ids))
        seqs = [self._new_seq(prompt_ids[i], model, row_params[i], collect(i), template, prefix) for i in order]
        ends: dict[int, Event] = {}
        try:
            self._enqueue(seqs)
            while len(ends) < len(seqs):
                i, ev = finished.get()
                if ev.finish_reason == "error":
                    raise TunesmithError(f"generation failed on prompt {i + 1} of {len(seqs)}; see the log above")
                ends[i] = ev
                if on_done is not None:
                    on_done(i)
        finally:
            for s in seqs:  # on an error or Ctrl-C: free the rows still queued or running
                s.handle.cancel()
        latency_s = (time.perf_counter() - t0) / len(seqs)
        sampled = {i: tuple(s.out_ids) for i, s in zip(order, seqs)}
        return [Completion("".join(parts[i]), ends[i].finish_reason or "stop", ends[i].prompt_tokens,
                           ends[i].completion_tokens, latency_s, sampled[i]) for i in range(len(seqs))]

    def generate(self, prompt_ids: list[int], model: str, params: SamplingParams) -> tuple[str, str, int]:
        """Blocking helper for one prompt: (text, finish_reason, completion_tokens)."""
        (c,) = self.generate_batch([prompt_ids], model, params)
        return c.text, c.finish_reason, c.completion_tokens

    def _new_seq(self, prompt_ids: Sequence[int], model: str, params: SamplingParams,
                 on_event: Callable[[Event], None], template: Any = None, prefix: _Prefix | None = None) -> _Seq:
        if not self.has_model(model):
            served = ", ".join(c.id for c in self.models())
            raise UnknownModelError(f"model '{model}' is not served here; available: {served}")
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        seq = _Seq(list(prompt_ids), None if model == self.base_id else model, params, on_event, Handle(),
                   prefix=prefix)
        if template is not None:
            seq.matcher = template.deep_copy()
        if params.temperature > 0:
            seq.generator = self._torch.Generator(device=self._device)
            # torch takes seeds of at most 64 bits; larger ones (OpenAI's is any integer) wrap.
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "big")
            seq.generator.manual_seed(seed % 2**64)
        return seq

    def _enqueue(self, seqs: list[_Seq], bounded: bool = False) -> None:
        with self._queue_cv:
            if self._closed:
                raise UsageError("the engine is shut down")
            if bounded and sum(not s.handle.cancelled for s in self._waiting) + len(seqs) > self._max_waiting:
                raise EngineOverloaded(f"the server is overloaded: {len(self._waiting)} requests are waiting for "
                                       "a place in the batch; retry shortly")
            for s in seqs:
                if s.group is None:
                    s.group = s.handle
            self._waiting.extend(seqs)
            self._queue_cv.notify()

    def close(self) -> None:
        with self._queue_cv:
            self._closed = True
            self._queue_cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the scheduler loop

    def _loop(self) -> None:
        torch = self._torch
        while True:
            with self._queue_cv:
                while not self._waiting and not self._rows and not self._closed:
                    self._queue_cv.wait()
                if self._closed:
                    break
                new = self._admit()
                self._joining = new
            try:
                with self._model_lock, torch.inference_mode(), autocast(self.precision, self._device.type):
                    self._evict()
                    new = [s for s in new if not self._finish_if_cancelled(s)]
                    for prefix in dict.fromkeys(s.prefix for s in new):  # newcomers sharing a prefix together
                        self._prefill([s for s in new if s.prefix is prefix], prefix)
                    if self._rows:
                        self._decode_step()
                    if self._draining:
                        self._delete_drained()
            except Exception:  # one bad step must not kill the server: fail its rows, go on
                log.exception("generation step failed; failing the requests in it")
                for s in self._rows + new:
                    if not s.done:
                        s.done = True
                        s.on_event(Event("", "error", len(s.prompt_ids), len(s.out_ids)))
                self._rows, self._cache, self._mask, self._next_ids = [], None, None, None
            self._joining = []
        for s in self._rows + self._waiting:
            if not s.done:
                s.on_event(Event("", "error", len(s.prompt_ids), len(s.out_ids)))

    def _row_tokens(self, s: _Seq) -> int:
        """The most KV positions a row can need: its prompt and its whole max_tokens."""
        return min(len(s.prompt_ids) + s.params.max_tokens, self.max_context)

    def _admit(self) -> list[_Seq]:
        """The waiting rows that join the batch now (call with _queue_cv held): one row per
        waiting request in turn (oldest request first) while the step stays within
        max_batch_rows and, padded to its longest row, max_batch_tokens; requests that had a
        row admitted least recently go first. Stops at the first
        row that does not fit, so a long row waits its turn instead of being passed forever.

        A request holds at most its fair share of the step's rows: max_batch_rows over the
        requests with rows running or waiting (all of them when it is alone). The share is
        kept even when slots stay free: a step's time grows with its rows (on a CPU about in
        proportion), so a big request's rows beyond its share would slow every other
        request's tokens, and the chats beside a 64 x 2 request took 3.6 times as long.
        A request already holding more than its share when others arrive gives back the
        rows it advanced least (preempted: they leave the batch at the next step and wait at
        the front of their request's turn), so newcomers wait for a step, not for the big
        request's rows to end. Rows that share a prefix (`generate_batch`'s) are each their
        own request and never hold more than one."""
        self._waiting = [s for s in self._waiting if not self._finish_if_cancelled(s)]
        turns: dict[Any, list[_Seq]] = {}
        for s in self._waiting:
            turns.setdefault(s.group, []).append(s)
        running = [s for s in self._rows if not s.done and not s.evicted]
        held = Counter(s.group for s in running)
        share = max(1, self._max_rows // max(1, len(held.keys() | turns.keys())))
        if any(held[g] < share for g in turns):  # someone waits within its share: take back the excess
            back: list[_Seq] = []
            for g, n in held.items():
                if n > share:
                    mine = sorted((s for s in running if s.group is g and s.prefix is None), key=lambda s: len(s.out_ids))
                    back += mine[:n - share]
            for s in back:
                s.evicted = True
                held[s.group] -= 1
                turns.setdefault(s.group, []).insert(0, s)
            if back:
                self._preempted += len(back)
                self._waiting = back + self._waiting
                running = [s for s in running if not s.evicted]
        rows, widest = len(running), max((self._row_tokens(s) for s in running), default=0)
        # Requests not yet served first (in arrival order), then the one served longest ago.
        queues = sorted(turns.values(), key=lambda q: self._last_turn.get(q[0].group, -1))
        taken: list[_Seq] = []
        full = False
        while queues and not full:
            later = []
            for q in queues:
                if held[q[0].group] >= share:  # this request waits until it holds fewer rows
                    continue
                wide = max(widest, self._row_tokens(q[0]))
                if rows >= self._max_rows or (rows and (rows + 1) * wide > self._max_tokens):
                    full = True
                    break
                taken.append(q.pop(0))
                held[taken[-1].group] += 1
                self._turns += 1
                self._last_turn[taken[-1].group] = self._turns
                rows, widest = rows + 1, wide
                if q:
                    later.append(q)
            queues = later
        if taken:
            chosen = set(map(id, taken))
            self._waiting = [s for s in self._waiting if id(s) not in chosen]
            still = {s.group for s in self._waiting}
            self._last_turn = {g: t for g, t in self._last_turn.items() if g in still}
        return taken

    def _evict(self) -> None:
        """Take the rows _admit preempted out of the batch (they wait again in the queue)."""
        self._keep_rows(lambda s: not s.evicted)

    def _finish_if_cancelled(self, s: _Seq) -> bool:
        if s.handle.cancelled and not s.done:
            self._cancelled += 1  # counted before it leaves the stats' running rows
            s.done = True
        return s.done

    def _forward(self, rows: list[_Seq], **kwargs: Any) -> Any:
        if self._peft is None or not self._peft.peft_config:
            return self._base(use_cache=True, **kwargs)
        names = {s.adapter for s in rows}
        if len(names) > 1:  # a mixed batch: peft splits each LoRA layer's input by row
            return self._peft(adapter_names=[_peft_name(s.adapter) if s.adapter else BASE_ROW for s in rows],
                              use_cache=True, **kwargs)
        # Every row on one model (eval's batches, one client's traffic): the plain forward,
        # without peft's per-row split, which made eval's adapter steps about 1.9x the base's.
        (name,) = names
        if name is None:
            with self._peft.disable_adapter():
                return self._peft(use_cache=True, **kwargs)
        if self._activated != name:  # our own record: peft's can be stale (see above)
            self._peft.set_adapter(_peft_name(name), inference_mode=True)
            self._activated = name
        return self._peft(use_cache=True, **kwargs)

    def _prefill(self, new: list[_Seq], prefix: _Prefix | None) -> None:
        """Prefill newcomers together (left-padded), sample their first token, join the batch.
        With a prefix, only each row's own tokens are computed, after a copy of its cache.
        Rows with the same prompt on the same model (a group of answers to one prompt, as
        reinforcement samples them, or a request's n choices) are computed once: each row
        starts from a copy of its prompt's cache and logits, and samples with its own seed."""
        import torch

        (DynamicCache,) = transformers_names("DynamicCache")  # this engine's thread, beside validating ones
        offset = len(prefix.ids) if prefix is not None else 0
        for s in new:
            s.evicted = False  # a preempted row resumes: its prompt and its answer so far
        context = {id(s): s.prompt_ids + s.out_ids for s in new}
        distinct: dict[tuple, int] = {}
        spread = [distinct.setdefault((s.adapter, tuple(context[id(s)][offset:])), len(distinct)) for s in new]
        heads = [new[spread.index(k)] for k in range(len(distinct))]
        # Only the last position's logits, picked by an index tensor rather than logits_to_keep=1:
        # transformers' slice of it is a strided view, and torch's linear on a strided 3-D bf16
        # input expands the LM head's weight to one copy per row (a 64-row prefill of
        # SmolLM2 spent 12 s copying 64 x 576 x 49,152 weights); the index gives a contiguous
        # input, an ordinary matmul and the same logits.
        last = torch.tensor([-1], device=self._device)
        ids, mask, positions = batch.left_padded([context[id(s)][offset:] for s in heads], self._pad_id, offset,
                                                 self._device)
        if prefix is None:
            cache = DynamicCache(config=self._config)
        else:
            if prefix.cache is None:
                prefix.cache = DynamicCache(config=self._config)
                self._forward(new[:1], input_ids=torch.tensor([prefix.ids], device=self._device),
                              cache=prefix.cache, logits_to_keep=last)
            cache = batch.repeat_prefix(prefix.cache, len(heads))
            mask = torch.cat([torch.ones((len(heads), offset), dtype=mask.dtype, device=self._device), mask], dim=1)
        for s in new:
            s.n_cached = len(context[id(s)])
        out = self._forward(
            heads, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=last
        )
        logits = out.logits[:, -1, :]
        if len(heads) < len(new):
            index = torch.tensor(spread, dtype=torch.long, device=self._device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        next_ids = self._sample(new, logits)
        self._merge(new, cache, mask, next_ids)

    def _decode_step(self) -> None:
        import torch

        rows = self._rows
        self._peak_rows = max(self._peak_rows, len(rows))
        self._steps += 1
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self._device)], dim=1)
        positions = torch.tensor([[s.n_cached] for s in rows], dtype=torch.long, device=self._device)
        out = self._forward(
            rows,
            input_ids=self._next_ids[:, None],
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
        )
        for s in rows:
            s.n_cached += 1
        self._next_ids = self._sample(rows, out.logits[:, -1, :])
        self._drop_done()

    def _merge(self, new: list[_Seq], cache: Any, mask: Any, next_ids: Any) -> None:
        """Append the prefilled rows to the running batch, left-padding the shorter side."""
        import torch

        if not self._rows:
            self._rows, self._cache, self._mask, self._next_ids = list(new), cache, mask, next_ids
        else:
            self._mask = batch.join(self._cache, self._mask, cache, mask)
            self._next_ids = torch.cat([self._next_ids, next_ids])
            self._rows = self._rows + list(new)
        self._drop_done()

    def _drop_done(self) -> None:
        """Remove finished or cancelled rows from the batch and trim all-padding columns."""
        for s in self._rows:
            self._finish_if_cancelled(s)
        self._keep_rows(lambda s: not s.done)

    def _keep_rows(self, wanted: Callable[[_Seq], bool]) -> None:
        """Keep only the batch's rows that are `wanted` (their cache, mask and next token)."""
        keep = [i for i, s in enumerate(self._rows) if wanted(s)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._next_ids = [], None, None, None
            return
        index = self._torch.tensor(keep, dtype=self._torch.long, device=self._device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = batch.keep_rows(self._cache, self._mask, index)
        self._next_ids = self._next_ids[index]

    # ------------------------------------------------------------------ sampling and text

    def _sample(self, rows: list[_Seq], logits: Any) -> Any:
        """Each row's next token. A row whose sampling fails (a bug, a grammar with no way on)
        fails alone: its request gets the error and leaves the batch, the others go on."""
        logits = logits.float()
        held = [i for i, s in enumerate(rows) if s.matcher is not None and not s.done]
        if held:  # rows without a constraint skip this entirely
            self._mask_logits(rows, held, logits)
        chosen = logits.argmax(dim=-1)
        for i, s in enumerate(rows):
            if s.done:
                continue
            try:
                chosen[i] = self._sample_row(s, logits[i], int(chosen[i]))
            except Exception:
                log.exception("sampling failed for one request; failing it alone")
                s.done = True
                s.on_event(Event("", "error", len(s.prompt_ids), len(s.out_ids)))
        for s, tok in zip(rows, chosen.tolist()):
            if s.matcher is not None and not s.done and tok not in self._eot:
                s.matcher.consume_token(tok)
            self._advance(s, tok)
            if s.matcher is not None and not s.done:
                self._finish_forced(s)
        return chosen

    def _finish_forced(self, s: _Seq) -> None:
        """End a constrained row now when its grammar leaves one way to the end (a --choices
        label told apart by its first tokens): the masked model could only write the forced tokens
        and end its turn, at any temperature, so the forward passes for them are skipped."""
        m = s.matcher
        forced = m.compute_ff_tokens()
        if forced:
            m.consume_tokens(forced)
        if not m.is_stopped():
            if forced:
                m.rollback(len(forced))
            return
        for tok in [*forced, min(self._eot)]:
            self._advance(s, tok)

    def _sample_row(self, s: _Seq, logits: Any, greedy: int) -> int:
        import torch

        p = s.params
        probs = None
        token = greedy
        if p.temperature >= MIN_TEMPERATURE:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (at least one token)
                drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
                token = int(torch.multinomial(probs, 1, generator=s.generator)[0])
            else:  # logits that overflow at this temperature: its limit, the greedy token
                probs = None
        return token

    def _mask_logits(self, rows: list[_Seq], held: list[int], logits: Any) -> None:
        """Set to -inf, in the rows at `held`, every token their grammar does not allow next:
        llguidance fills one bit per token, unpacked here to a boolean row."""
        import numpy as np
        import torch

        vocab = logits.shape[1]
        bits = np.full((len(held), (vocab + 31) // 32), -1, dtype=np.int32)
        for k, i in enumerate(held):
            m = rows[i].matcher
            if m.is_error() or m.is_stopped() and not m.is_accepting():
                bits[k] = 0  # nothing fits (should not happen): end the answer below
            else:
                m.unsafe_compute_mask_ptr(bits[k].ctypes.data, bits[k].nbytes)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
        allowed[~allowed.any(axis=1), min(self._eot)] = True
        index = torch.tensor(held, device=logits.device)
        logits[index] = logits[index].masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def _text(self, ids: list[int]) -> str:
        """The text of generated tokens, as streamed (special tokens left out)."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def _advance(self, s: _Seq, tok: int) -> None:
        """Record one sampled token for a row and send the text it completes."""
        if s.done:
            return
        s.out_ids.append(tok)
        finish = None
        if tok in self._eot:
            finish = "stop"
            text = self._text(s.out_ids[:-1])
        else:
            text = self._text(s.out_ids)
        cut = _find_stop(text, s.params.stop, max(0, s.sent_chars - max((len(x) for x in s.params.stop), default=0)))
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and (len(s.out_ids) >= s.params.max_tokens or s.n_cached + 1 >= self.max_context):
            finish = "length"
        if finish is None:
            # Hold back a half-decoded character and any tail that may begin a stop string.
            safe = len(text.rstrip("\ufffd"))
            safe -= _stop_prefix_len(text[:safe], s.params.stop)
            delta = text[s.sent_chars : max(safe, s.sent_chars)]
        else:
            delta = text[s.sent_chars :]
            s.done = True
        s.sent_chars += len(delta)
        if delta or finish:
            s.on_event(Event(delta, finish, len(s.prompt_ids), len(s.out_ids)))


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(x, start) for x in stops if x) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for x in stops:
        for n in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:n]):
                best = n
                break
    return best
