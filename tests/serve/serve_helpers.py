"""Helpers for the serving tests: a live uvicorn server on a free loopback port (in a
thread); a normal streamed chat that must finish beside a hostile request (`normal_chat`,
`post`, `error_of`); the tool-calling tests' tools; the engine's helpers (adapters made with
peft, waiting for the engine to go idle, a JSON schema) re-exported from tests/generate and
tests/tiny_model.py."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

GENERATE_TESTS = Path(__file__).resolve().parent.parent / "generate"
if str(GENERATE_TESTS) not in sys.path:  # imported by name, as tests/dashboard reuses these
    sys.path.insert(0, str(GENERATE_TESTS))

from generate_helpers import TICKET, wait_until_idle  # noqa: E402,F401
from tiny_model import make_adapter  # noqa: E402,F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run a FastAPI app with uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# Tools for the tool-calling tests. Small: the tiny model reads one byte a token or so, in a
# 512-token context.
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                      "required": ["city"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {
    "name": "alarm", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
                                    "additionalProperties": False}}}
TOOLS = [WEATHER, ALARM]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

NORMAL = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def normal_chat(server: str, model: str = "alpha", api_key: str = "unused"):
    """A normal streamed chat running in a thread; on exit, asserts it finished with text."""
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=api_key, max_retries=0, timeout=120)
    result: dict = {}

    def run() -> None:
        try:
            chunks = list(client.chat.completions.create(model=model, messages=NORMAL, max_tokens=24, temperature=0,
                                                         stream=True))
            result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=120)
    assert "error" not in result, result
    assert result["finish"] in ("stop", "length") and (result["text"] or result["finish"] == "stop")


def post(server: str, path: str, body, headers: dict | None = None, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json", **(headers or {})})


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]
