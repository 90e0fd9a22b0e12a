"""The graders API, as OpenAI's: POST /v1/fine_tuning/alpha/graders/validate and /run.

The routes only translate: `graders.types.parse_grader` and `graders.run` do the work, a
malformed grader is a 400 whose `param` names the field (`grader.operation`). Judges
(score_model, label_model) are asked at `judge` (an `Endpoint`); by default that is this
server itself, at the address its socket is bound to (never the request's Host header,
which a client could point elsewhere, with this server's key), so the judge is any model it
serves. Python graders run only on a server started with --allow-python-graders (their code
can read the server user's files, docs/rft.md); elsewhere they are a 400 naming the grader.

A run holds a thread (and a python grader's child, or a judge's call to this server) for as
long as it grades, so runs are admitted by `GraderSlots`: `Limits.max_running_graders` at once,
in threads of their own (never those that chats render in, which a judge's call needs),
`max_waiting_graders` waiting, the rest a 429 `server_overloaded` to retry. Parsing and
checking a grader (its templates, formula and source) run off the event loop, one at a time.

    curl -s localhost:8000/v1/fine_tuning/alpha/graders/run -H 'content-type: application/json' -d \
      '{"grader": {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
        "reference": "{{item.label}}", "operation": "eq"}, "model_sample": "refund", "item": {"label": "refund"}}'
"""

from __future__ import annotations

from typing import Any, Callable

import anyio
from fastapi import APIRouter, Request

from tunesmith.graders.judge import Endpoint
from tunesmith.graders.python_sandbox import PythonLimits
from tunesmith.graders.run import run_grader, validate_grader
from tunesmith.graders.types import GraderError, MultiGrader, PythonGrader, parse_grader
from tunesmith.serve import protocol as p
from tunesmith.serve.errors import APIError
from tunesmith.serve.limits import Limits

RETRY_AFTER_S = 2


def refuse_python(grader: Any, allowed: bool, param: str = "grader") -> None:
    """A GraderError naming the python grader (also inside multi) unless the operator allowed them."""
    if allowed:
        return
    if isinstance(grader, PythonGrader):
        raise GraderError(f"{param}: python graders are off on this server (their code could read the "
                          "server's files); its operator can allow them with tunesmith serve "
                          "--allow-python-graders", f"{param}.type")
    if isinstance(grader, MultiGrader):
        for name, sub in grader.graders.items():
            refuse_python(sub, allowed, f"{param}.graders.{name}")


def own_endpoint(request: Request) -> Endpoint:
    """This server, at the address its socket is bound to (never the request's Host header)."""
    host, port = request.scope.get("server") or ("127.0.0.1", 8000)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return Endpoint(f"{request.url.scheme}://{host}:{port}/v1", getattr(request.app.state, "api_key", None))


class GraderSlots:
    """Admission for grader runs (and other long work: `what`): `running` at once in threads of
    their own, `waiting` more queued in turn without a thread, the rest refused with 429. Used
    from the event loop only."""

    def __init__(self, running: int, waiting: int, what: str = "grader runs"):
        self.limiter = anyio.CapacityLimiter(running)
        self.most = running + waiting
        self.in_flight = 0
        self.what = what

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.in_flight >= self.most:
            raise APIError(429, f"the server is running and queueing {self.in_flight} {self.what}, its most; retry "
                                "shortly", code="server_overloaded", retry_after_s=RETRY_AFTER_S)
        self.in_flight += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.in_flight -= 1


def checked_grader(obj: Any, allow_python: bool) -> Any:
    """The typed grader, checked (a GraderError naming the field otherwise). Python graders are
    refused before their source is parsed: parsing 256 kB takes half a second, holding the GIL."""
    grader = parse_grader(obj)
    refuse_python(grader, allow_python)
    validate_grader(grader)
    return grader


def build_graders_router(judge: Endpoint | None = None, allow_python: bool = False,
                         limits: Limits = Limits()) -> APIRouter:
    """The two routes; `judge` None asks judges at this server (the address it is bound to)."""
    router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])
    slots = GraderSlots(limits.max_running_graders, limits.max_waiting_graders)
    # Checks one at a time: python source is parsed holding the GIL (a 4 MB body of it, 7 s
    # here), so concurrent checks would starve the event loop and the engine of it.
    checks = GraderSlots(1, limits.max_running_graders + limits.max_waiting_graders)

    @router.post("/validate")
    async def validate(body: p.GraderValidateRequest) -> dict[str, Any]:
        grader = await checks.run(checked_grader, body.grader, allow_python)
        return {"grader": grader.model_dump(exclude_none=True)}

    @router.post("/run")
    async def run(body: p.GraderRunRequest, request: Request) -> dict[str, Any]:
        grader = await checks.run(checked_grader, body.grader, allow_python)
        endpoint = judge or own_endpoint(request)
        result = await slots.run(run_grader, grader, body.model_sample, body.item, endpoint, PythonLimits(),
                                 limits.grader_run_s)
        return result.to_openai()

    return router
