"""Structured outputs in a request: `response_format` (json_object, json_schema) and vLLM's two
extensions through `extra_body` (`guided_regex`, `guided_choice`), turned into the one
constraint the engine holds the answer to, compiled once per request off the event loop.

    client.chat.completions.create(model=..., messages=..., extra_body={"guided_choice": ["yes", "no"]})
"""

from __future__ import annotations

from typing import Any

from fastapi.concurrency import run_in_threadpool

from tunesmith.generate.constraints import ANY_OBJECT, Constraint, ConstraintError
from tunesmith.serve import protocol as p
from tunesmith.serve.errors import APIError


def request_constraint(req: p.ChatCompletionRequest | p.CompletionRequest) -> tuple[Constraint | None, str]:
    """The constraint a request asks for and the parameter that asked, or (None, ""); a 400
    when it asks for two, or for one that cannot be honoured (naming the limit passed)."""
    asked = [name for name in ("guided_regex", "guided_choice") if getattr(req, name) is not None]
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        asked.append("response_format")
    if len(asked) > 1:
        raise APIError(400, f"give one of {', '.join(asked)}, not several", param=asked[1])
    if not asked:
        return None, ""
    param = asked[0]
    try:
        if param == "guided_regex":
            return Constraint.regex(req.guided_regex), param
        if param == "guided_choice":
            return Constraint.choice(req.guided_choice), param
        return _response_format(req), "response_format.json_schema.schema"
    except ConstraintError as exc:
        raise APIError(400, str(exc), param=param if param != "response_format" else
                       "response_format.json_schema.schema", code=exc.code) from None


def _response_format(req: Any) -> Constraint:
    if req.response_format.type == "json_object":
        # As OpenAI requires: a model not told to write JSON is a poor judge of when to stop.
        if not any("json" in m.text().lower() for m in req.messages):
            raise APIError(400, "'messages' must contain the word 'json' in some form, to use 'response_format' of "
                                "type 'json_object'", param="messages")
        return Constraint.json_schema(ANY_OBJECT)
    spec = req.response_format.json_schema or {}
    if not isinstance(spec.get("schema"), dict):
        raise APIError(400, "response_format json_schema needs 'json_schema': {\"name\": ..., \"schema\": {...}}",
                       param="response_format.json_schema")
    return Constraint.json_schema(spec["schema"])


async def compile_constraint(engine: Any, constraint: Constraint | None, param: str) -> None:
    """Compile in a worker thread (a schema at the limits takes up to a second, the event loop
    goes on serving); the engine keeps the result for the request's rows."""
    if constraint is None:
        return
    try:
        await run_in_threadpool(engine.compile, constraint)
    except ConstraintError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code=exc.code) from None
