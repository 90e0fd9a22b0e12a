"""Helpers for the serving tests: a live uvicorn server on a free loopback port (in a
thread); the engine's helpers (adapters made with peft, waiting for the engine to go idle,
a JSON schema) re-exported from tests/generate and tests/tiny_model.py."""

from __future__ import annotations

import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
