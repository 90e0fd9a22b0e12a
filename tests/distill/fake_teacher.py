"""A real (tiny) OpenAI-compatible HTTP server that misbehaves on purpose, for the distill
tests: per-prompt failure scripts (429, 500 ...), requests held until the test lets them
answer, and a record of every request.

Nothing here waits for a fixed time: a held request answers when its event is set (by the
test, or by another prompt's reply), so a loaded machine only makes the tests slower,
never wrong. Answers are a plain function of the last user message, so tests know what to
expect.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

# Safety nets only: a held request answers anyway after HOLD_CAP_S, and waits give up after
# WAIT_CAP_S, so that a broken client fails its test instead of hanging it. A passing run
# never reaches either.
HOLD_CAP_S = 60.0
WAIT_CAP_S = 120.0


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
    hold_first: dict[str, threading.Event] = field(default_factory=dict)
    """prompt -> an event its first request waits for before it answers (later requests of
    the prompt answer at once). Leaving the server sets them all."""
    error_message: str = "the teacher failed on purpose"
    requests: list[dict] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)
    """Guards the records; notified on every request."""
    _replied: dict[str, threading.Event] = field(default_factory=dict)

    def asked(self, prompt: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["prompt"] == prompt)

    def replied(self, prompt: str) -> threading.Event:
        """Set once a 200 answer to `prompt` has been sent."""
        with self.lock:
            return self._replied.setdefault(prompt, threading.Event())

    def wait_for_requests(self, count: int) -> None:
        """Block until the server has received `count` requests."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.requests) >= count, timeout=WAIT_CAP_S):
                pytest.fail(f"the teacher got {len(self.requests)} request(s), not {count}")


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test, a kill)
                pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            with script.lock:
                first = not any(r["prompt"] == prompt for r in script.requests)
                script.requests.append({"prompt": prompt, "body": body,
                                        "authorization": self.headers.get("Authorization")})
                queued = script.fail_first.get(prompt)
                status = queued.pop(0) if queued else script.always.get(prompt, 200)
                script.lock.notify_all()
            if first and prompt in script.hold_first:
                script.hold_first[prompt].wait(HOLD_CAP_S)
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
            script.replied(prompt).set()

    return Handler


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of concurrent connections beyond it
    # has its SYNs dropped and retried a second or more later, a delay no test asked for.
    request_queue_size = 128
    daemon_threads = True


@contextmanager
def fake_teacher(script: Script) -> Iterator[str]:
    """Serve `script` on a free loopback port; yields the base URL (ending in /v1)."""
    server = _Server(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        for event in script.hold_first.values():  # no handler thread outlives the test
            event.set()
        server.shutdown()
        server.server_close()


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen) -> list[str]:
    """Block until `path` holds `count` whole lines (written by `proc`); returns them."""
    deadline = time.monotonic() + WAIT_CAP_S
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines(keepends=True)
        whole = lines if text.endswith("\n") else lines[:-1]
        if len(whole) >= count:
            return whole
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"exited {proc.returncode} with {len(whole)} line(s) in {path}, not {count}:\n{stdout}{stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"{len(whole)} line(s) in {path} after {WAIT_CAP_S:.0f} s, not {count}")
        time.sleep(0.02)
