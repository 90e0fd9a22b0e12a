"""Every error the server answers, in OpenAI's shape, and the one API key check.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Routes raise `APIError` (or let a `TunesmithError` through); the handlers that
`add_error_handlers(app)` installs turn everything into that body, so the inference and the
jobs routes answer the same exception with the same status:

- a request body or query that does not validate: 400 naming the first bad `param`;
- the engine's queue full (`EngineOverloaded`): 429 `server_overloaded` with `Retry-After`;
- the engine's process gone (`EngineStopped`): 503 `engine_unavailable`;
- a malformed grader (`GraderError`): 400 whose `param` names the field;
- `ModelNotFoundError`: 404 `model_not_found`; an adapter name already taken: 409;
  any other `UsageError` or `DataError`: 400 with its sentence;
- anything else (a `TunesmithError` that is not the request's fault, a bug): 500 with a
  generic message; the detail goes to the server log, never to the client.

    python -c "from tunesmith.serve.errors import check_api_key; check_api_key('Bearer k', 'k')"
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import DataError, ModelNotFoundError, TunesmithError, UsageError
from tunesmith.generate.engine import AdapterConflictError, EngineOverloaded
from tunesmith.generate.requests import EngineStopped
from tunesmith.graders.types import GraderError
from tunesmith.serve.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("tunesmith.serve")

INTERNAL_ERROR = "internal server error; see the server log"
NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
          "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
WRONG_KEY = ("Incorrect API key provided. The key is the one this server was started with "
             "(--api-key or $TUNESMITH_API_KEY).")
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    """An error response: the HTTP status and OpenAI's {message, type, param, code}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Make every error `app` answers OpenAI-shaped (see the module docstring for the mapping)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(TunesmithError, _tunesmith_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc.errors()).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own: no such route or method, a body over the size limit, a dashboard file.
    return APIError(exc.status_code, _unparsed_body(exc) or str(exc.detail),
                    code=_HTTP_CODES.get(exc.status_code)).response()


def _unparsed_body(exc: StarletteHTTPException) -> str | None:
    """What FastAPI's "There was an error parsing the body" was: json.loads refuses a body
    nested too deep, or an integer too long, with errors FastAPI does not pass on."""
    if exc.status_code != 400:
        return None
    if isinstance(exc.__cause__, RecursionError):
        return "the request body is not JSON this server reads: it nests deeper than about 1,000 levels"
    if isinstance(exc.__cause__, ValueError) and "digits" in str(exc.__cause__):
        return (f"the request body is not JSON this server reads: a number has more than "
                f"{sys.get_int_max_str_digits():,} digits")
    return None


async def _tunesmith_error(request: Request, exc: TunesmithError) -> JSONResponse:
    error = error_from_tunesmith(exc)
    if error.status >= 500:
        log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return error.response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, INTERNAL_ERROR).response()


def error_from_tunesmith(exc: TunesmithError) -> APIError:
    """The response for a TunesmithError: the request's fault (usage, data) or the server's."""
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), code="server_overloaded", retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, GraderError):  # param names the grader's field, as OpenAI's does
        return APIError(400, str(exc), param=exc.param, code="invalid_grader")
    if isinstance(exc, AdapterConflictError):
        return APIError(409, str(exc), param="name", code="conflict")
    if isinstance(exc, (UsageError, DataError)):  # e.g. a chat template refusing the conversation
        return APIError(400, str(exc))
    # e.g. a TrainingError or a download that failed: nothing the request can change.
    return APIError(500, INTERNAL_ERROR)


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 naming the first bad parameter, with a sentence for every bad parameter."""
    sentences: dict[str, str] = {}
    wanted: dict[str, list[str]] = {}  # per param, what each branch of a union asked for
    for err in errors:
        if err.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
        param = _param_name(err.get("loc", ()))
        if param in sentences and param not in wanted:
            continue
        if not param:
            sentences[""] = "the request body must be a JSON object (sent with Content-Type: application/json)"
        elif err.get("type") == "extra_forbidden":
            sentences.setdefault(param, f"unknown parameter '{param}' (this server does not support it)")
        elif err.get("type") == "missing":
            sentences.setdefault(param, f"missing required parameter '{param}'")
        else:
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            msgs = wanted.setdefault(param, [])
            if msg not in msgs:
                msgs.append(msg)
            got = json.dumps(err.get("input"), default=str)[:80]
            sentences[param] = f"invalid '{param}': {' or '.join(msgs)} (got {got})"
    first = next(iter(sentences), None) or None
    return APIError(400, "; ".join(sentences.values()) or "invalid request", param=first, code="invalid_parameter")


def _param_name(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'; ('query', 'limit') -> 'limit'
    (where the value came from, and union branch tags, dropped)."""
    name = ""
    for i, part in enumerate(loc):
        if i == 0 and part in ("body", "query", "path", "header", "cookie"):
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in ("str", "int", "float", "bool"):
            name += ("." if name else "") + str(part)
        else:
            break
    return name


def check_api_key(authorization: str | None, expected: str | None) -> None:
    """Raise the 401 unless `authorization` is 'Bearer <expected>'; no key configured, no check."""
    if not expected:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, NO_KEY, code="invalid_api_key")
    if not secrets.compare_digest(token.encode(), expected.encode()):
        raise APIError(401, WRONG_KEY, code="invalid_api_key")


class KeyGate:
    """ASGI middleware: the API key checked on /v1/* and /openapi.json before anything
    reads the body, so a malformed body without a key is a 401 (not a 400 that shows the
    parser ran) and the API's schema is not served to strangers. /health and the
    dashboard's static files stay open."""

    PROTECTED = ("/v1/", "/openapi.json")

    def __init__(self, app: Any, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.api_key and scope["type"] == "http" and scope.get("path", "").startswith(self.PROTECTED):
            headers = dict(scope.get("headers") or [])
            try:
                check_api_key(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
            except APIError as exc:
                return await exc.response()(scope, receive, send)
        await self.app(scope, receive, send)


async def require_api_key(request: Request) -> None:
    """Dependency for the routes that need the key: the app's `state.api_key` (None: open)."""
    check_api_key(request.headers.get("authorization"), request.app.state.api_key)
