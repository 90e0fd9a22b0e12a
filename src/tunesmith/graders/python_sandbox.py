"""Python graders run in a child process that the OS holds to OpenAI's documented limits.

`PythonSandbox(source, limits)` starts `python -I` (no user site, no PYTHON* variables) in an
empty temporary folder with a bare environment; the child (`sandbox_child.py`) enters a new
user and network namespace and lowers its rlimits before the grader's code runs, so no code
it runs can reach a network or raise them back. Here the parent keeps a wall-clock timeout
per sample. One child grades many samples (starting Python per sample costs more than most
graders) until it has used half its CPU budget; a sample that raises, hangs past the timeout, crashes the child, or returns NaN or
a non-number scores nothing and says why, and the next sample gets a fresh child.

Where user namespaces are not allowed (some containers), a python grader fails with that
reason: it never runs without the network cut.

    python -c "from tunesmith.graders.python_sandbox import PythonSandbox; \
s = PythonSandbox('def grade(sample, item): return 1.0'); print(s.grade({}, {})); s.close()"
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_REPLY_BYTES = 1024 * 1024
"""Longest line the child may answer with: its code can write to the protocol pipe itself, so
the parent reads at most this much before it calls the child broken (never buffering more)."""


class ProtocolError(Exception):
    """The child wrote something that is not one of its answers (the grader's code can reach the pipe)."""


@dataclass(frozen=True)
class PythonLimits:
    """OpenAI's limits for python graders: 256 kB of source, 2 minutes, 2 GB of memory, 1 GB of disk."""

    max_source_bytes: int = 256 * 1024
    timeout_s: float = 120.0
    """Wall-clock time for one sample (the parent kills the child past it)."""
    cpu_s: int = 120
    """CPU seconds for one child's life (RLIMIT_CPU); a child that has used half is replaced, so
    every sample has at least half of it."""
    memory_bytes: int = 2 * 1024**3
    """Address space (RLIMIT_AS)."""
    file_bytes: int = 1024**3
    """Largest file the grader may write (RLIMIT_FSIZE), in its own temporary folder."""
    start_timeout_s: float = 60.0
    """Time for the child to start and run the source's top level (its imports)."""


@dataclass
class Outcome:
    score: float | None
    error: str | None = None
    setup_error: bool = False
    """The source itself failed (did not compile, no grade(), no isolation): not this sample's fault."""


class PythonSandbox:
    """Grades samples with one grader's source, restarting its child after any failure."""

    def __init__(self, source: str, limits: PythonLimits = PythonLimits()):
        size = len(source.encode())
        if size > limits.max_source_bytes:
            raise ValueError(f"the python grader's source is {size} bytes; at most {limits.max_source_bytes}")
        self.source, self.limits = source, limits
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._folder: tempfile.TemporaryDirectory | None = None

    def grade(self, sample: dict[str, Any], item: Any, timeout_s: float | None = None) -> Outcome:
        """One sample's score; `timeout_s` (at most the limits') bounds starting the child too."""
        timeout_s = self.limits.timeout_s if timeout_s is None else min(timeout_s, self.limits.timeout_s)
        if self._proc is None:
            failed = self._start(min(timeout_s, self.limits.start_timeout_s))
            if failed:
                return failed
        try:
            line = json.dumps({"sample": sample, "item": item})
        except (ValueError, RecursionError):
            return Outcome(None, "the sample or item is nested too deep to send to the grader")
        try:
            self._send_line(line)
        except (BrokenPipeError, OSError):
            return self._fail("the grader's process died")
        try:
            reply = self._read(timeout_s)
        except ProtocolError as exc:
            return self._fail(str(exc))
        if reply is None:
            return self._fail(self._why_gone(f"timed out after {timeout_s:g} s"))
        cpu_s = reply.get("cpu_s", 0)
        if not isinstance(cpu_s, (int, float)) or cpu_s > self.limits.cpu_s / 2:
            # RLIMIT_CPU counts a child's whole life: retire it while every sample still has
            # at least half the budget, rather than let a later sample die of earlier ones.
            self.close()
        if "error" in reply:
            return Outcome(None, str(reply["error"])[-2000:])
        score = reply.get("score")
        if not isinstance(score, float) or not math.isfinite(score):
            return Outcome(None, f"grade() returned {score!r}, not a finite number")
        return Outcome(score)

    def _start(self, timeout_s: float) -> Outcome | None:
        self._folder = tempfile.TemporaryDirectory(prefix="tunesmith-grader-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._folder.name, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen([sys.executable, "-I", "-c", CHILD.read_text()], cwd=self._folder.name,
                                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self._buffer = b""
        limits = {k: v for k, v in asdict(self.limits).items() if k in ("cpu_s", "memory_bytes", "file_bytes")}
        self._send_line(json.dumps({"source": self.source, "limits": limits}))
        try:
            reply = self._read(timeout_s)
        except ProtocolError as exc:
            reply = {"fatal": str(exc)}
        if reply is None or "fatal" in reply:
            why = str(reply["fatal"])[-2000:] if reply else self._why_gone(f"did not start in {timeout_s:g} s")
            self.close()
            return Outcome(None, why, setup_error=True)
        return None

    def _send_line(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((line + "\n").encode())
        self._proc.stdin.flush()

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """The child's next answer, or None when it does not come in time or the child is gone;
        a ProtocolError when what came is no answer (too long, not a JSON object)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the child closed its end: it is ending (or hangs without it: killed after)
                try:
                    self._proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES and b"\n" not in self._buffer:
                raise ProtocolError(f"the grader wrote over {MAX_REPLY_BYTES} bytes into its protocol pipe "
                                    "without ending a line; print to stdout or stderr instead")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            raise ProtocolError(f"the grader wrote {line[:80]!r} into its protocol pipe, which is no answer; print "
                                "to stdout or stderr instead")
        return reply

    def _why_gone(self, otherwise: str) -> str:
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return otherwise
        if code < 0:
            import signal

            name = signal.Signals(-code).name
            hint = " (CPU time limit)" if name == "SIGXCPU" else " (killed)" if name == "SIGKILL" else ""
            return f"the grader's process ended with {name}{hint}"
        return f"the grader's process exited with code {code}"

    def _fail(self, why: str) -> Outcome:
        self.close()
        return Outcome(None, why)

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe:
                    pipe.close()
            self._proc = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
