"""A real (tiny) OpenAI-compatible HTTP server that misbehaves on purpose, for the distill
tests: per-prompt failure scripts (429, 500 ...), delays, and a record of every request.

Answers are a plain function of the last user message, so tests know what to expect.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


def echo_answer(prompt: str) -> str:
    """`say X` answers X; anything else answers `answer to: <prompt>`."""
    return prompt[4:] if prompt.startswith("say ") else f"answer to: {prompt}"


@dataclass
class Script:
    answer: Callable[[str], str] = echo_answer
    fail_first: dict[str, list[int]] = field(default_factory=dict)
    """prompt -> HTTP statuses to answer with, in order, before succeeding."""
    always: dict[str, int] = field(default_factory=dict)
    """prompt -> HTTP status answered every time."""
    slow_first_s: dict[str, float] = field(default_factory=dict)
    """prompt -> seconds to stall on its first request only (to trip a client timeout)."""
    delay_s: float = 0.0
    error_message: str = "the teacher failed on purpose"
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def asked(self, prompt: str) -> int:
        return sum(1 for r in self.requests if r["prompt"] == prompt)


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test, a kill)
                pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            with script.lock:
                first = script.asked(prompt) == 0
                script.requests.append({"prompt": prompt, "body": body,
                                        "authorization": self.headers.get("Authorization")})
                queued = script.fail_first.get(prompt)
                status = queued.pop(0) if queued else script.always.get(prompt, 200)
            if first and prompt in script.slow_first_s:
                time.sleep(script.slow_first_s[prompt])
            if script.delay_s:
                time.sleep(script.delay_s)
            if status != 200:
                self._send(status, {"error": {"message": script.error_message, "type": "server_error"}})
                return
            n = body.get("n", 1)
            text = script.answer(prompt)
            self._send(200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            for i in range(n)],
                "usage": {"prompt_tokens": len(prompt.split()) + 5, "completion_tokens": n * len(text.split()),
                          "total_tokens": len(prompt.split()) + 5 + n * len(text.split())},
            })

    return Handler


@contextmanager
def fake_teacher(script: Script) -> Iterator[str]:
    """Serve `script` on a free loopback port; yields the base URL (ending in /v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
