"""The program a python grader runs in (passed to `python -I -c`; it imports no tunesmith).

It reads its limits and the grader's source as the first line of stdin, makes the OS hold
it to them (a new user and network namespace: no network interface but a loopback that is
down; rlimits on CPU time, address space, file size and open files, lowered for good; a
lower CPU priority than the server's), and
only then runs the source. Then, for each line {"sample": ..., "item": ...}, it writes one
line {"score": x} or {"error": "..."} to the protocol pipe; the grader's own prints go to
stderr, never into the protocol.
"""

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def isolate(limits):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET) failed: " + os.strerror(ctypes.get_errno()))
    cpu, memory, files = limits["cpu_s"], limits["memory_bytes"], limits["file_bytes"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.nice(10)  # a grader that spins yields the CPU to the server that started it


def main():
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        protocol.write(json.dumps(obj) + "\n")

    setup = json.loads(sys.stdin.readline())
    try:
        isolate(setup["limits"])
    except Exception as exc:
        send({"fatal": "cannot isolate the grader: %s" % exc})
        return
    namespace = {"__name__": "grader"}
    try:
        exec(compile(setup["source"], "<grader>", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException:
        send({"fatal": traceback.format_exc(limit=-3)[-2000:]})
        return
    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            score = grade(request["sample"], request["item"])
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                reply = {"error": "grade() returned %s, not a number" % type(score).__name__}
            else:
                reply = {"score": float(score)}
        except BaseException:
            reply = {"error": traceback.format_exc(limit=-3)[-2000:]}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        reply["cpu_s"] = usage.ru_utime + usage.ru_stime  # the parent retires a child past half its budget
        send(reply)


main()
