"""Hostile load: 16 normal streamed chats, alone and then while hostile requests of every
kind in issue 19 keep arriving. Every normal chat must complete, and their p95 latency
stays within 2x of the run without the hostile traffic.

Starts `tunesmith serve` on a free loopback port (a tiny random model with --tiny, else
--model), with an API key, a 1 MB upload limit and a fresh $TUNESMITH_HOME holding two bad
adapter folders; runs the 16 chats alone (the baseline), then again with one thread per
hostile kind sending its request in a loop; prints the p50/p95 latency of both runs, the
hostile requests' answers by kind and status, and exits non-zero if a normal chat failed, a
hostile request got a 5xx (or no answer), or the p95 ratio is above 2.

The kinds: the JSON bodies of `hostile_kinds` (sampling, sizes, schemas, unicode, numbers,
nesting, adapter paths and names, a job on a model outside the allowed folders, no key); two
uploads (20 MB of form fields, chunked, under the 1 MB limit; one ~1 MB line, then its
validation report, then its deletion); and the largest request the limits accept (64
prompts x n=2, 16 new tokens each), which is answered (200) and really loads the engine.

    .venv/bin/python bench/hostile_load.py --tiny --threads 1
    .venv/bin/python bench/hostile_load.py --model smollm2-135m-instruct --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import httpx
from openai import OpenAI

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
TOPICS = ["a cat", "the sea", "a robot", "a city at night", "an old library", "a mountain village",
          "a lost key", "the first snow", "a train journey", "a lighthouse", "a garden", "a storm",
          "a market", "a violin", "a desert", "a bakery"]


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def hostile_kinds(model: str, home: Path) -> dict[str, str | bytes]:
    """One JSON request body per hostile kind of issue 19 (raw, so that malformed ones stay
    malformed); `home` is the server's $TUNESMITH_HOME, holding `bad_adapters`' folders."""
    user = [{"role": "user", "content": "Tell me about JSON."}]

    def chat(**extra) -> str:
        return json.dumps({"model": model, "messages": user, "max_tokens": 8, **extra})

    return {
        "near-zero temperature": chat(temperature=1e-300, n=4),
        "2,001 short messages": json.dumps({"model": model, "max_tokens": 1, "messages": [
            {"role": "user" if k % 2 == 0 else "assistant", "content": f"m{k}"} for k in range(2001)]}),
        "4,096 prompts x n=8": json.dumps({"model": model, "prompt": ["a"] * 4096, "n": 8}),
        "2,049 messages": json.dumps({"model": model, "messages": user * 2049}),
        "a prompt far past the context": json.dumps({"model": model, "prompt": "a" * 3_000_000}),
        "a schema 300 deep": chat(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": _nested_schema(300)}}),
        "a lone surrogate": chat(user="\ud800"),
        "seed 2**70": chat(seed=2**70),
        "5,000-digit number": ('{"model": "%s", "messages": [], "max_tokens": 1%s}' % (model, "0" * 5000)),
        "100,000-deep nesting": '{"model": "x", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "an adapter path outside the roots": json.dumps({"name": "x", "path": "/etc"}),
        "an ft: adapter name": json.dumps({"name": "ft:x:y:z", "path": "."}),
        "an adapter of rank 10**6": json.dumps({"name": "wide", "path": str(home / "adapters" / "wide")}),
        "a malformed tunesmith_adapter.json": json.dumps({"name": "bad", "path": str(home / "adapters" / "bad")}),
        "a job on a model outside the roots": json.dumps({"model": "/etc", "training_file": "file-x"}),
        "a malformed body without a key": b"{not json",
        # Accepted: the most one request may ask (Limits: 64 prompts, 128 rows), really decoded.
        "64 prompts x n=2 (accepted)": json.dumps({"model": model, "prompt": [f"Tell me about {t}." for t in TOPICS] * 4,
                                                   "n": 2, "max_tokens": 16}),
    }


PATHS = {"4,096 prompts x n=8": "/completions", "a prompt far past the context": "/completions",
         "an adapter path outside the roots": "/adapters", "an ft: adapter name": "/adapters",
         "an adapter of rank 10**6": "/adapters", "a malformed tunesmith_adapter.json": "/adapters",
         "a job on a model outside the roots": "/fine_tuning/jobs",
         "64 prompts x n=2 (accepted)": "/completions"}
UPLOAD_LIMIT_MB = 1.0
"""The bench server's --max-upload-mb (the issue's case: 20 MB of form fields under 1 MB)."""
BOUNDARY = "hostile"
FORM_FIELDS, ONE_LINE = "20 MB of form fields, 1 MB limit", "a one-line upload of 0.99 MB"
THROUGH_MODEL = "a one-line upload: checked through the model"


def bad_adapters(home: Path) -> None:
    """Two adapter folders under the server's home (so inside the allowed roots), each with
    a safetensors file with no tensors: one whose adapter_config.json asks rank 10**6, one
    whose tunesmith_adapter.json is not JSON. Both must be 400s before peft allocates."""
    empty_safetensors = (2).to_bytes(8, "little") + b"{}"
    for name, config, meta in (("wide", {"peft_type": "LORA", "r": 10**6, "lora_alpha": 16}, None),
                               ("bad", {"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "{not json")):
        folder = home / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(empty_safetensors)
        if meta is not None:
            (folder / "tunesmith_adapter.json").write_text(meta)


def multipart(parts: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def upload_kinds(model_path: str) -> dict[str, Callable[[httpx.Client, str], list[tuple[str, int]]]]:
    """The upload kinds, each a function (client, url) -> [(kind, status)] for one round.
    model_path: the served model's folder (the server allows its parent), which the upload is
    also checked through, a line of 0.99 MB rendered and tokenized by the server."""
    headers = {"Authorization": f"Bearer {KEY}", "content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    # 340 fields of 60 KB (each under the per-field cap, 20 MB together), sent chunked: no
    # Content-Length, so only the server's count while streaming can stop it.
    fields = multipart([("purpose", b"fine-tune", None), *[(f"f{k}", b"x" * 60_000, None) for k in range(340)],
                        ("file", b'{"messages": []}\n', "t.jsonl")])
    # One line as long as the 1 MB limit allows (the JSONL reader's own cap, 64 MB, is far
    # above any upload limit a bench server should take): a valid chat example.
    line = json.dumps({"messages": [{"role": "user", "content": "a" * 990_000},
                                    {"role": "assistant", "content": "b"}]}).encode()
    one_line = multipart([("purpose", b"fine-tune", None), ("file", line, "line.jsonl")])

    def chunks(body: bytes):
        return (body[i:i + 65536] for i in range(0, len(body), 65536))

    def form_fields(http: httpx.Client, url: str) -> list[tuple[str, int]]:
        return [(FORM_FIELDS, http.post(url + "/files", content=chunks(fields),
                                                               headers=headers).status_code)]

    def huge_line(http: httpx.Client, url: str) -> list[tuple[str, int]]:
        resp = http.post(url + "/files", content=one_line, headers=headers)
        out = [(ONE_LINE, resp.status_code)]
        if resp.status_code == 200:  # the upload was checked; read the report, then delete it
            file_id = resp.json()["id"]
            out.append(("a one-line upload: its validation", http.get(url + f"/files/{file_id}/validation",
                                                            headers=AUTH).status_code))
            out.append((THROUGH_MODEL, http.get(url + f"/files/{file_id}/validation", params={"model": model_path},
                                                headers=AUTH).status_code))
            out.append(("a one-line upload: its deletion", http.delete(url + f"/files/{file_id}", headers=AUTH).status_code))
        return out

    return {FORM_FIELDS: form_fields, ONE_LINE: huge_line}


def one_chat(client: OpenAI, model: str, topic: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=max_tokens, temperature=0, stream=True)
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if finish not in ("stop", "length"):
        raise RuntimeError(f"a normal chat ended with {finish!r}")
    return time.perf_counter() - t0


def normal_run(url: str, model: str, max_tokens: int) -> list[float]:
    """16 concurrent streamed chats; their latencies (a failed chat raises after all end)."""
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)
    results: list[float | Exception] = [0.0] * 16

    def work(i: int) -> None:
        try:
            results[i] = one_chat(client, model, TOPICS[i], max_tokens)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise SystemExit(f"{len(failed)} of 16 normal chats failed: {failed[0]!r}")
    return sorted(results)  # type: ignore[arg-type]


def hostile_client(url: str, model: str, home: Path, ready, stop, results, skip: tuple[str, ...] = (),
                   model_path: str = "") -> None:
    """A separate process (hostile clients are other clients: their work must not slow the
    measured chats' own client): one thread per hostile kind, each sending its request at
    once (`ready` says they started) and again 0.2 s after each answer until `stop`, at
    least once; the (kind, status) counts go to `results`."""
    answers: Counter = Counter()

    def post(kind: str, body: str | bytes) -> Callable[[httpx.Client, str], list[tuple[str, int]]]:
        headers = {"content-type": "application/json"} if "without a key" in kind else AUTH
        path = PATHS.get(kind, "/chat/completions")
        return lambda http, url: [(kind, http.post(url + path, content=body, headers=headers).status_code)]

    def loop(kind: str, send: Callable[[httpx.Client, str], list[tuple[str, int]]]) -> None:
        with httpx.Client(timeout=600) as http:
            while True:  # at least once, however short the measured run
                try:
                    for answer in send(http, url):
                        answers[answer] += 1
                except httpx.HTTPError as exc:
                    answers[(kind, type(exc).__name__)] += 1
                if stop.wait(0.2):
                    break

    sends = {kind: post(kind, body) for kind, body in hostile_kinds(model, home).items()}
    kinds = {k: v for k, v in {**sends, **upload_kinds(model_path)}.items() if not any(part in k for part in skip)}
    threads = [threading.Thread(target=loop, args=kv) for kv in kinds.items()]
    for t in threads:
        t.start()
    ready.set()
    for t in threads:
        t.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put((dict(answers), usage.ru_utime + usage.ru_stime))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The processes below `pid` (the engine's process, the model-check pool), from /proc (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            found += [k, *children(k)]
    return found


def tree_cpu_s(pid: int) -> dict[int, float]:
    """cpu_s of `pid` and of each process below it."""
    out = {}
    for p in (pid, *children(pid)):
        try:
            out[p] = cpu_s(p)
        except OSError:  # it ended meanwhile
            pass
    return out


def start_server(model: str, threads: int | None, home: Path, in_process: bool = False) -> tuple[subprocess.Popen, str]:
    """`tunesmith serve` on a free loopback port, its home `home`; the model's folder's parent
    is an allowed root, so a file can be checked through the model by its path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "tunesmith"), "serve", "--model", model, "--port", str(port),
           "--workers", "0", "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--allow-path", str(Path(model).parent)]
    if threads:
        cmd += ["--threads", str(threads)]
    if in_process:
        cmd += ["--engine-in-process"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TUNESMITH_API_KEY": KEY,
           "TUNESMITH_HOME": str(home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if time.time() > deadline:
                proc.terminate()
                raise SystemExit("the server did not come up in 300 s")
            time.sleep(0.5)


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_model import save_tiny_model

    return str(save_tiny_model(folder))


def registry_path(spec: str) -> str:
    from tunesmith.models.registry import resolve_model

    return str(resolve_model(spec).path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model to serve.")
    ap.add_argument("--tiny", action="store_true", help="Serve the tests' tiny random model instead.")
    ap.add_argument("--threads", type=int, help="--threads for the server.")
    ap.add_argument("--engine-in-process", action="store_true",
                    help="Serve with --engine-in-process (the engine's thread beside the event loop), the peer of "
                         "the default engine process.")
    ap.add_argument("--max-tokens", type=int, default=64, help="New tokens per normal chat.")
    ap.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="Leave out the hostile kinds whose name holds TEXT (repeatable): to find which kinds cost "
                         "the chats most. A run that skips any is not the issue's test.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # The server's home is a fresh folder (its jobs database, uploads and bad adapters),
        # so a registry model is named by its path in the usual home.
        model_spec = tiny_model(Path(tmp) / "tiny") if args.tiny else registry_path(args.model)
        home = Path(tmp) / "home"
        bad_adapters(home)
        proc, url = start_server(model_spec, args.threads, home, args.engine_in_process)
        try:
            model = httpx.get(url + "/models", headers=AUTH).json()["data"][0]["id"]
            normal_run(url, model, 4)  # warm-up
            alone = normal_run(url, model, args.max_tokens)
            ready, stop, results = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Queue()
            hostile = multiprocessing.Process(target=hostile_client, args=(url, model, home, ready, stop, results,
                                                                                tuple(args.skip), model_spec))
            hostile.start()
            ready.wait(timeout=300)
            time.sleep(1.0)  # the hostile requests are already arriving when the chats start
            t0, server0, own0 = time.perf_counter(), tree_cpu_s(proc.pid), sum(os.times()[:2])
            under = normal_run(url, model, args.max_tokens)
            wall, server1, own_cpu = time.perf_counter() - t0, tree_cpu_s(proc.pid), sum(os.times()[:2]) - own0
            server_cpu = server1.pop(proc.pid) - server0.pop(proc.pid)
            kids_cpu = sorted((c - server0.get(k, 0.0) for k, c in server1.items()), reverse=True)
            stop.set()
            answers, hostile_cpu = results.get(timeout=600)  # the requests in flight end first
            hostile.join(timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    pct = lambda xs, q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    kids = ", ".join(f"{c:.1f}" for c in kids_cpu if c >= 0.05) or "none busy"
    print(f"CPU seconds while the chats ran under traffic ({wall:.1f} s on {os.cpu_count()} CPUs): server "
          f"{server_cpu:.1f} and its child processes {kids} (the engine's first, unless it runs in-process), "
          f"chats' client {own_cpu:.1f}; the hostile client {hostile_cpu:.1f} over its whole run")
    print(f"16 streamed chats x {args.max_tokens} new tokens, model {model}, engine "
          f"{'in the server process' if args.engine_in_process else 'in its own process'}")
    print(f"{'':24}{'p50 s':>8}{'p95 s':>8}")
    for name, lat in (("alone", alone), ("under hostile traffic", under)):
        print(f"{name:24}{statistics.median(lat):>8.2f}{pct(lat, 0.95):>8.2f}")
    ratio = pct(under, 0.95) / pct(alone, 0.95)
    print(f"p95 ratio: {ratio:.2f} (must be at most 2.0); all 32 normal chats completed")
    print("hostile requests sent, by kind and answer:")
    for (kind, status), count in sorted(answers.items(), key=lambda kv: kv[0][0]):
        print(f"  {kind:36} {status!s:>5} x{count}")
    accepted = sum(c for (kind, status), c in answers.items() if kind == "64 prompts x n=2 (accepted)" and status == 200)
    print(f"the largest accepted request (64 prompts x n=2 x 16 tokens) answered 200 x{accepted}")
    server_errors = [k for (k, s) in answers if not isinstance(s, int) or s >= 500]
    unanswered = {k for k in (*hostile_kinds(model, home), FORM_FIELDS, ONE_LINE, THROUGH_MODEL)
                  if not any(part in k for part in args.skip)} - {k for k, _ in answers}
    if server_errors or unanswered or ratio > 2.0:
        raise SystemExit(f"FAILED: 5xx or no answer for {sorted(set(server_errors) | unanswered)}; "
                         f"p95 ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
