"""The graders API, as OpenAI's: POST /v1/fine_tuning/alpha/graders/validate and /run.

The routes only translate: `graders.types.parse_grader` and `graders.run` do the work, a
malformed grader is a 400 whose `param` names the field (`grader.operation`). Judges
(score_model, label_model) are asked at `judge` (an `Endpoint`); by default that is this
server itself, so the judge is any model it serves, the same API key included.

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
from tunesmith.graders.types import parse_grader
from tunesmith.serve import protocol as p


def build_graders_router(judge: Endpoint | None = None) -> APIRouter:
    """The two routes; `judge` None asks judges at this server (the request's own base URL)."""
    router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])

    @router.post("/validate")
    async def validate(body: p.GraderValidateRequest) -> dict[str, Any]:
        grader = parse_grader(body.grader)
        validate_grader(grader)
        return {"grader": grader.model_dump(exclude_none=True)}

    @router.post("/run")
    async def run(body: p.GraderRunRequest, request: Request) -> dict[str, Any]:
        grader = parse_grader(body.grader)
        validate_grader(grader)
        endpoint = judge or Endpoint(str(request.base_url).rstrip("/") + "/v1", request.app.state.api_key)
        # A python grader's child and a judge's HTTP call block: keep them off the event loop.
        result = await run_in_threadpool(run_grader, grader, body.model_sample, body.item, endpoint)
        return result.to_openai()

    return router
