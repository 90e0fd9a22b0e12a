"""The graders API, as OpenAI's: POST /v1/fine_tuning/alpha/graders/validate and /run.

The routes only translate: `graders.types.parse_grader` and `graders.run` do the work, a
malformed grader is a 400 whose `param` names the field (`grader.operation`). Judges
(score_model, label_model) are asked at `judge` (an `Endpoint`); by default that is this
server itself, at the address its socket is bound to (never the request's Host header,
which a client could point elsewhere, with this server's key), so the judge is any model it
serves. Python graders run only on a server started with --allow-python-graders (their code
can read the server user's files, docs/rft.md); elsewhere they are a 400 naming the grader.

    curl -s localhost:8000/v1/fine_tuning/alpha/graders/run -H 'content-type: application/json' -d \
      '{"grader": {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
        "reference": "{{item.label}}", "operation": "eq"}, "model_sample": "refund", "item": {"label": "refund"}}'
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from tunesmith.graders.judge import Endpoint
from tunesmith.graders.run import run_grader, validate_grader
from tunesmith.graders.types import GraderError, MultiGrader, PythonGrader, parse_grader
from tunesmith.serve import protocol as p


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


def build_graders_router(judge: Endpoint | None = None, allow_python: bool = False) -> APIRouter:
    """The two routes; `judge` None asks judges at this server (the address it is bound to)."""
    router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])

    @router.post("/validate")
    async def validate(body: p.GraderValidateRequest) -> dict[str, Any]:
        grader = parse_grader(body.grader)
        validate_grader(grader)
        refuse_python(grader, allow_python)
        return {"grader": grader.model_dump(exclude_none=True)}

    @router.post("/run")
    async def run(body: p.GraderRunRequest, request: Request) -> dict[str, Any]:
        grader = parse_grader(body.grader)
        validate_grader(grader)
        refuse_python(grader, allow_python)
        endpoint = judge or own_endpoint(request)
        # A python grader's child and a judge's HTTP call block: keep them off the event loop.
        result = await run_in_threadpool(run_grader, grader, body.model_sample, body.item, endpoint)
        return result.to_openai()

    return router
