"""Python graders run in a child process the OS limits: a grader that raises, hangs, burns CPU,
allocates too much, reaches for the network or returns a non-number scores 0 as a grader error,
and the caller goes on grading."""

from __future__ import annotations

import os
import socket

import pytest

from tunesmith.graders.python_sandbox import PythonLimits, PythonSandbox
from tunesmith.graders.run import Grading, validate_grader
from tunesmith.graders.types import GraderError, parse_grader

SOURCE = '''
import os, socket, sys

def grade(sample, item):
    kind = item.get("kind")
    if kind == "hang":
        while True:
            pass
    if kind == "raise":
        raise ValueError("boom")
    if kind == "nan":
        return float("nan")
    if kind == "text":
        return "1.0"
    if kind == "memory":
        block = bytearray(item["bytes"])
        return 1.0
    if kind == "network":
        socket.create_connection(("127.0.0.1", item["port"]), timeout=2)
        return 1.0
    if kind == "exit":
        os._exit(3)
    if kind == "pid":
        return float(os.getpid())
    if kind == "burn":
        import time
        end = time.process_time() + item["cpu_s"]
        while time.process_time() < end:
            pass
        return 1.0
    print("graders may print; it never reaches the protocol")
    return 1.0 if sample["output_text"] == item["answer"] else 0.0
'''

FAST = PythonLimits(timeout_s=3, cpu_s=30, memory_bytes=1024**3, start_timeout_s=30)


def grading(limits: PythonLimits = FAST) -> Grading:
    return Grading(parse_grader({"type": "python", "name": "py", "source": SOURCE}), limits=limits)


def test_a_python_grader_scores_and_its_child_is_reused():
    with grading() as g:
        assert g.run("yes", {"answer": "yes"}).reward == 1.0
        assert g.run("no", {"answer": "yes"}).reward == 0.0
        first, second = g.run("x", {"kind": "pid"}).reward, g.run("x", {"kind": "pid"}).reward
        assert first == second and first != os.getpid()


@pytest.mark.parametrize(("item", "words"), [
    ({"kind": "raise"}, "ValueError: boom"),
    ({"kind": "nan"}, "not a finite number"),
    ({"kind": "text"}, "returned str, not a number"),
    ({"kind": "hang"}, "timed out after 3 s"),
    ({"kind": "exit"}, "exited with code 3"),
    ({"kind": "memory", "bytes": 2 * 1024**3}, "MemoryError"),
])
def test_a_failing_grader_scores_zero_and_the_next_sample_is_graded(item, words):
    with grading() as g:
        failed = g.run("x", item)
        assert failed.reward == 0.0 and failed.errors["python_grader_runtime_error"] is True
        assert words in failed.errors["python_grader_runtime_error_details"]
        assert failed.to_openai()["metadata"]["errors"]["python_grader_runtime_error"] is True
        assert g.run("yes", {"answer": "yes"}).reward == 1.0


def test_the_cpu_limit_is_the_kernels():
    limits = PythonLimits(timeout_s=60, cpu_s=1, memory_bytes=1024**3, start_timeout_s=30)
    with grading(limits) as g:
        failed = g.run("x", {"kind": "hang"})
        assert "SIGXCPU" in failed.errors["python_grader_runtime_error_details"]


def test_a_child_is_retired_before_earlier_samples_use_up_its_cpu_budget():
    limits = PythonLimits(timeout_s=30, cpu_s=2, memory_bytes=1024**3, start_timeout_s=30)
    with grading(limits) as g:
        results = [g.run("x", {"kind": "burn", "cpu_s": 0.6}) for _ in range(5)]  # 3 s of CPU in all
        assert [r.reward for r in results] == [1.0] * 5, [r.errors for r in results]


def test_the_grader_has_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        with grading() as g:
            failed = g.run("x", {"kind": "network", "port": port})
    assert "Network is unreachable" in failed.errors["python_grader_runtime_error_details"]


def test_source_that_fails_at_import_is_a_server_error_for_every_sample():
    grader = parse_grader({"type": "python", "name": "py", "source": "import no_such_module\ndef grade(s, i): return 1"})
    with Grading(grader, limits=FAST) as g:
        for _ in range(2):
            result = g.run("x", {})
            assert result.reward == 0.0 and result.errors["python_grader_server_error"] is True
            assert "No module named 'no_such_module'" in result.errors["python_grader_server_error_type"]


def test_the_source_size_limit():
    big = "def grade(sample, item):\n    return 1.0\n" + "#" * 300_000
    with pytest.raises(GraderError, match="at most 262144"):
        validate_grader(parse_grader({"type": "python", "name": "py", "source": big}))
    with pytest.raises(ValueError, match="at most 262144"):
        PythonSandbox(big)
