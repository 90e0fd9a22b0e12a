"""The OpenAI-compatible HTTP app: thin routers over an Engine, errors in OpenAI's shape.

    tunesmith serve --model smollm2-135m-instruct --adapter support=runs/support
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model": "support", "messages": [{"role": "user", "content": "Hi"}]}'

`create_app(engine, settings, routers=...)` builds a new app each call (no module state);
other parts (the jobs API) pass their routers in and share the API key check. Errors are
answered by `serve.errors`: routes raise, its handlers give OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunesmith.errors import AdapterError
from tunesmith.generate.constraints import Constraint
from tunesmith.generate.engine import Engine, Event, SamplingParams, UnknownModelError
from tunesmith.serve import limits as lim
from tunesmith.serve.limits import MAX_BODY_BYTES, BodyLimit
from tunesmith.serve import protocol as p
from tunesmith.serve import tools
from tunesmith.serve.errors import APIError, KeyGate, add_error_handlers, require_api_key
from tunesmith.serve.graders_api import build_graders_router
from tunesmith.serve.structured import compile_constraint, request_constraint
from tunesmith.settings import Settings

log = logging.getLogger("tunesmith.serve")

DISCONNECT_POLL_S = 0.5
"""How often a request waiting for tokens checks that its client is still there."""
GENERATION_FAILED = "generation failed; see the server log"


def create_app(engine: Engine, settings: Settings | None = None, routers: Sequence[APIRouter] = (),
               limits: lim.Limits = lim.Limits()) -> FastAPI:
    """A new FastAPI app serving `engine`; `routers` are mounted behind the same API key;
    `limits` bound each request's work (serve/limits.py)."""
    settings = settings or Settings.from_env()
    app = FastAPI(title="tunesmith", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.api_key = settings.api_key
    app.state.limits = limits
    app.state.adapter_lock = asyncio.Lock()
    app.state.path_roots = settings.path_roots()
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(KeyGate, api_key=settings.api_key)  # added last: runs first
    app.include_router(health_router)
    graders_router = build_graders_router(allow_python=settings.python_graders, limits=limits)
    for router in (models_router, completions_router, adapters_router, graders_router, *routers):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    return app


# ----------------------------------------------------------------------------- generation bridge


class ClientGone(Exception):
    """The client closed the connection while its request was generating."""


class Generation:
    """Several engine requests (n choices, several prompts) read as one async event stream."""

    def __init__(self, engine: Engine, model: str, jobs: list[tuple[list[int], SamplingParams]]):
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.handles = []
        self.pending = len(jobs)
        self._checked_at = time.monotonic()
        group = object()  # this request's rows take one turn together in the engine's admission
        try:
            for i, (ids, params) in enumerate(jobs):
                self.handles.append(engine.submit(ids, model, params, self._sender(loop, i), group=group))
        except BaseException:
            self.cancel()
            raise

    def _sender(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[Event], None]:
        def on_event(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (index, ev))
            except RuntimeError:  # the loop is gone (server shutting down)
                pass
        return on_event

    async def next(self, request: Request | None = None) -> tuple[int, Event]:
        """The next event; with a request, raise ClientGone if its client went away
        (checked every DISCONNECT_POLL_S, whether or not tokens are flowing)."""
        while True:
            if request is not None and time.monotonic() - self._checked_at >= DISCONNECT_POLL_S:
                self._checked_at = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()
            try:
                index, ev = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if ev.finish_reason:
                self.pending -= 1
            return index, ev

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def _sampling(req: p.ChatCompletionRequest | p.CompletionRequest, max_tokens: int, index: int,
              constraint: Constraint | None = None) -> SamplingParams:
    seed = None if req.seed is None else req.seed + index
    return SamplingParams(max_tokens, req.temperature, req.top_p, p.stop_list(req.stop), seed, constraint)


def _budget(engine: Engine, prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
    """max_tokens for a prompt, or a 400 when prompt (+ requested tokens) exceed the context."""
    room = engine.max_context - prompt_len
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens, but the model's context is {engine.max_context}; shorten it",
            param=prompt_param, code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"{param}={requested} does not fit: the prompt is {prompt_len} tokens and the context "
            f"{engine.max_context}, so at most {room} can be generated; lower {param}",
            param=param, code="context_length_exceeded",
        )
    return requested if requested is not None else room


def _check_model(engine: Engine, model: str) -> None:
    if not any(c.id == model for c in engine.models()):
        served = ", ".join(c.id for c in engine.models())
        raise UnknownModelError(f"model '{model}' is not served here; available: {served}")


def _sse(obj: Any) -> str:
    """One server-sent event. Like OpenAI's, a delta carries only the keys it has, and a
    chunk has `usage` only when it is the usage chunk."""
    data = obj.model_dump()
    if data.get("usage") is None:
        data.pop("usage", None)
    for choice in data.get("choices", []):
        if "delta" in choice:
            choice["delta"] = _without_none(choice["delta"])
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


async def _stream(gen: Generation, request: Request, chunks: Callable[[int, Event], list[Any]],
                  final: Callable[[], Any | None]) -> AsyncIterator[str]:
    """SSE body: the chunks for every event, an optional usage chunk, then [DONE]."""
    try:
        while gen.pending:
            index, ev = await gen.next(request)
            if ev.finish_reason == "error":
                yield _sse(APIError(500, GENERATION_FAILED).body())
                break
            for chunk in chunks(index, ev):
                yield _sse(chunk)
        else:
            last = final()
            if last is not None:
                yield _sse(last)
        yield "data: [DONE]\n\n"
    except ClientGone:
        log.info("client went away mid-stream; its request is cancelled")
    finally:
        gen.cancel()  # a client that went away mid-stream frees its rows at the next step


def _usage(prompt_tokens: int, completion_tokens: int) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def _wants_usage(req: p.ChatCompletionRequest | p.CompletionRequest) -> bool:
    """Whether a stream ends with a usage chunk: only when asked (stream_options.include_usage), as OpenAI's."""
    return bool(req.stream_options and req.stream_options.include_usage)


async def _collect(gen: Generation, request: Request, n_choices: int) -> tuple[list[str], list[str], int]:
    texts, reasons, completion = [""] * n_choices, ["stop"] * n_choices, 0
    try:
        while gen.pending:
            index, ev = await gen.next(request)
            texts[index] += ev.text
            if ev.finish_reason:
                if ev.finish_reason == "error":
                    raise APIError(500, GENERATION_FAILED)
                reasons[index] = ev.finish_reason
                completion += ev.completion_tokens
    except ClientGone:
        log.info("client went away before its answer; its request is cancelled")
    finally:
        gen.cancel()
    return texts, reasons, completion


# ----------------------------------------------------------------------------- routers

health_router = APIRouter()
models_router = APIRouter(prefix="/v1")
completions_router = APIRouter(prefix="/v1")
adapters_router = APIRouter(prefix="/v1")


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_limits(request: Request) -> lim.Limits:
    return request.app.state.limits


@health_router.get("/health")
async def health(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    # stats may ask the engine's process (generate/process.py): off the event loop
    return {"status": "ok", "models": [c.id for c in engine.models()], **await run_in_threadpool(engine.stats)}


def _model_object(card: Any) -> p.ModelObject:
    return p.ModelObject(id=card.id, created=card.created, parent=card.parent)


@models_router.get("/models")
async def list_models(engine: Engine = Depends(get_engine)) -> p.ModelList:
    return p.ModelList(data=[_model_object(c) for c in engine.models()])


@models_router.get("/models/{model_id}")
async def get_model(model_id: str, engine: Engine = Depends(get_engine)) -> p.ModelObject:
    _check_model(engine, model_id)
    return next(_model_object(c) for c in engine.models() if c.id == model_id)


@completions_router.post("/chat/completions", response_model=None)
async def chat_completions(req: p.ChatCompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                           limits: lim.Limits = Depends(get_limits)):
    _check_model(engine, req.model)
    lim.check_messages(len(req.messages), limits)
    fmt = req.response_format.json_schema if req.response_format else None
    if isinstance((fmt or {}).get("schema"), dict):
        lim.check_schema(fmt["schema"], limits)  # its size, on the raw dict, before anything walks it
    constraint, param = request_constraint(req)  # a bad response_format is a 400 before any work
    for i, tool in enumerate(req.tools or ()):
        if tool.function.parameters is not None:
            lim.check_schema(tool.function.parameters, limits, param=f"tools[{i}].function.parameters")
    calls = tools.plan(req, constraint is not None, engine.tool_syntax)
    if calls is not None:
        constraint, param = calls.constraint, "tools"
    messages = tools.wire_messages(req)
    lim.check_length([m["content"] for m in messages], engine.max_context, "messages", limits)
    lim.check_message_tokens([m["role"] for m in messages], engine.message_tokens, engine.max_context)
    # Rendering and tokenizing take time in the length of the conversation: off the event loop.
    prompt = await run_in_threadpool(engine.render_chat, messages, tools.tool_definitions(req))
    limit, limit_param = req.token_limit()
    max_tokens = _budget(engine, len(prompt), limit, limit_param, "messages")
    await compile_constraint(engine, constraint, param)
    gen = Generation(engine, req.model, [(prompt, _sampling(req, max_tokens, i, constraint)) for i in range(req.n)])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return _stream_chat(gen, request, req, rid, created, len(prompt), calls)
    texts, reasons, completion = await _collect(gen, request, req.n)
    answers = [tools.message(calls.syntax, t, r) if calls else (p.AssistantMessage(content=t), r)
               for t, r in zip(texts, reasons)]
    return p.ChatCompletion(
        id=rid, created=created, model=req.model,
        choices=[p.ChatChoice(index=i, message=m, finish_reason=r) for i, (m, r) in enumerate(answers)],
        usage=_usage(len(prompt), completion),
    )


def _stream_chat(gen: Generation, request: Request, req: p.ChatCompletionRequest, rid: str, created: int,
                 prompt_tokens: int, calls: tools.ToolPlan | None) -> StreamingResponse:
    started: set[int] = set()
    completion = [0]
    readers = {i: tools.CallStream(calls.syntax) for i in range(req.n)} if calls else {}

    def chunk(choices: list[p.ChatChunkChoice]) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices)

    def chunks(index: int, ev: Event) -> list[Any]:
        out = []
        if index not in started:  # OpenAI opens each choice with the role
            started.add(index)
            out.append(chunk([p.ChatChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))]))
        reader = readers.get(index)
        deltas = reader.feed(ev.text, bool(ev.finish_reason)) if reader else [p.Delta(content=ev.text)] * bool(ev.text)
        out += [chunk([p.ChatChunkChoice(index=index, delta=d)]) for d in deltas]
        if ev.finish_reason:
            completion[0] += ev.completion_tokens
            reason = reader.finish_reason(ev.finish_reason) if reader else ev.finish_reason
            out.append(chunk([p.ChatChunkChoice(index=index, delta=p.Delta(), finish_reason=reason)]))
        return out

    def final() -> Any:
        if not _wants_usage(req):
            return None
        return p.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                     usage=_usage(prompt_tokens, completion[0]))

    return StreamingResponse(_stream(gen, request, chunks, final), media_type="text/event-stream")


@completions_router.post("/completions", response_model=None)
async def completions(req: p.CompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                      limits: lim.Limits = Depends(get_limits)):
    _check_model(engine, req.model)
    texts = req.prompts()
    lim.check_prompts(len(texts), req.n, limits)
    for text in texts:
        lim.check_length([text], engine.max_context, "prompt", limits)
    constraint, param = request_constraint(req)
    prompts = await run_in_threadpool(lambda: [engine.encode(text) for text in texts])
    if not prompts:
        raise APIError(400, "'prompt' is an empty list; give a string or a list of strings", param="prompt")
    jobs = []
    for k, ids in enumerate(prompts):
        max_tokens = _budget(engine, len(ids), req.max_tokens, "max_tokens", "prompt")
        jobs += [(ids, _sampling(req, max_tokens, i, constraint)) for i in range(req.n)]
    await compile_constraint(engine, constraint, param)
    gen = Generation(engine, req.model, jobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(ids) for ids in prompts)
    if req.stream:
        completion = [0]

        def chunks(index: int, ev: Event) -> list[Any]:
            completion[0] += ev.completion_tokens if ev.finish_reason else 0
            if not ev.text and not ev.finish_reason:
                return []
            return [p.Completion(id=rid, created=created, model=req.model,
                                 choices=[p.CompletionChoice(index=index, text=ev.text, finish_reason=ev.finish_reason)])]

        def final() -> Any:
            if not _wants_usage(req):
                return None
            return p.Completion(id=rid, created=created, model=req.model, choices=[],
                                usage=_usage(prompt_tokens, completion[0]))

        return StreamingResponse(_stream(gen, request, chunks, final), media_type="text/event-stream")
    texts, reasons, completion = await _collect(gen, request, len(jobs))
    return p.Completion(
        id=rid, created=created, model=req.model,
        choices=[p.CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))],
        usage=_usage(prompt_tokens, completion),
    )


@adapters_router.post("/adapters", status_code=201)
async def add_adapter(req: p.AdapterRequest, request: Request, engine: Engine = Depends(get_engine)) -> p.ModelObject:
    if req.name.startswith("ft:"):
        raise APIError(400, f"adapter name '{req.name}': names starting with 'ft:' are reserved for the models "
                            "fine-tuning jobs publish; choose another name", param="name", code="reserved_name")
    path = lim.confined_path(req.path, request.app.state.path_roots, "path", "adapter")
    # One load at a time, so that two requests cannot both pass the count below.
    async with request.app.state.adapter_lock:
        lim.check_adapters(sum(1 for c in engine.models() if c.parent and not c.id.startswith("ft:")),
                           request.app.state.limits)
        # Loading reads files and waits for the current step: keep it off the event loop.
        try:
            card = await run_in_threadpool(engine.add_adapter, req.name, path)
        except AdapterError as exc:  # its files are the client's to fix: name them
            raise APIError(400, str(exc), param="path", code="invalid_adapter") from None
    return _model_object(card)


@adapters_router.delete("/adapters/{name}")
async def remove_adapter(name: str, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    await run_in_threadpool(engine.remove_adapter, name)
    return {"id": name, "object": "model", "deleted": True}
