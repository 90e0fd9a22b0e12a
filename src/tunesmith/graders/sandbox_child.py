"""The program a python grader runs in (passed to `python -I -c`; it imports no tunesmith).

It reads its limits and the grader's source as the first line of stdin, makes the OS hold
it to them (a new user, network and PID namespace: no network interface but a loopback that
is down, and every process the grader starts killed with it; rlimits on CPU time, address
space, file size and processes, lowered for good; a lower CPU priority than the server's), and
only then runs the source. Then, for each line {"sample": ..., "item": ...}, it writes one
line {"score": x} or {"error": "..."} to the protocol pipe; the grader's own prints go to
stderr, never into the protocol.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG = 1
MAX_PROCESSES = 64
"""Processes and threads the grader may run at once (RLIMIT_NPROC, counted in its namespace)."""


def isolate(limits, keep_fds):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) failed: "
                      + os.strerror(ctypes.get_errno()))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The next child is process 1 of a new PID namespace: when it ends, or this process is
    # killed (the parent's timeout), the kernel kills every process the grader started;
    # setsid() cannot leave a namespace, so nothing it forks outlives it.
    pid = os.fork()
    if pid:
        relay_exit(pid, keep_fds)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # Process 1 ignores a signal it has no handler for, SIGXCPU's default included.
    signal.signal(signal.SIGXCPU, lambda *_: os._exit(128 + signal.SIGXCPU))
    cpu, memory, files = limits["cpu_s"], limits["memory_bytes"], limits["file_bytes"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
    os.nice(10)  # a grader that spins yields the CPU to the server that started it


def relay_exit(pid, keep_fds):
    """Wait for the grader's process 1 and end as it did, so the parent reads its exit code
    or signal (SIGXCPU included) as if it were the grader's own."""
    for fd in keep_fds:  # the pipes are the grader's: the parent sees them close when it ends
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
    elif os.WEXITSTATUS(status) == 128 + signal.SIGXCPU:
        sig = signal.SIGXCPU
    else:
        os._exit(os.WEXITSTATUS(status))
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def main():
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        protocol.write(json.dumps(obj) + "\n")

    setup = json.loads(sys.stdin.readline())
    try:
        isolate(setup["limits"], (0, protocol.fileno()))
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
