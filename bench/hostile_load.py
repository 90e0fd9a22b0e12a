"""Hostile load: 16 normal streamed chats, alone and then while hostile requests of every
kind in issue 19 keep arriving. Every normal chat must complete, and their p95 latency
stays within 2x of the run without the hostile traffic.

Starts `tunesmith serve` on a free loopback port (a tiny random model with --tiny, else
--model), with an API key; runs the 16 chats alone (the baseline), then again with one
thread per hostile kind sending its request in a loop; prints the p50/p95 latency of both
runs, the hostile requests' answers by kind and status, and exits non-zero if a normal chat
failed, a hostile request got a 5xx, or the p95 ratio is above 2.

    .venv/bin/python bench/hostile_load.py --tiny --threads 1
    .venv/bin/python bench/hostile_load.py --model smollm2-135m-instruct --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

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


def hostile_kinds(model: str) -> dict[str, str | bytes]:
    """One request body per hostile kind of issue 19 (raw, so that malformed ones stay malformed)."""
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
        "a malformed body without a key": b"{not json",
    }


PATHS = {"4,096 prompts x n=8": "/completions", "a prompt far past the context": "/completions",
         "an adapter path outside the roots": "/adapters", "an ft: adapter name": "/adapters"}


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


def hostile_client(url: str, model: str, stop, results) -> None:
    """A separate process (hostile clients are other clients: their work must not slow the
    measured chats' own client): one thread per hostile kind, each sending its request
    every 0.2 s until `stop`; the (kind, status) counts go to `results` at the end."""
    answers: Counter = Counter()

    def loop(kind: str, body: str | bytes) -> None:
        headers = {"content-type": "application/json"} if "without a key" in kind else AUTH
        path = PATHS.get(kind, "/chat/completions")
        with httpx.Client(timeout=600) as http:
            while not stop.is_set():
                try:
                    status = http.post(url + path, content=body, headers=headers).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                answers[(kind, status)] += 1
                stop.wait(0.2)

    threads = [threading.Thread(target=loop, args=kv) for kv in hostile_kinds(model).items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(dict(answers))


def start_server(model: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "tunesmith"), "serve", "--model", model, "--port", str(port),
           "--workers", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TUNESMITH_API_KEY": KEY}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model to serve.")
    ap.add_argument("--tiny", action="store_true", help="Serve the tests' tiny random model instead.")
    ap.add_argument("--threads", type=int, help="--threads for the server.")
    ap.add_argument("--max-tokens", type=int, default=64, help="New tokens per normal chat.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_spec = tiny_model(Path(tmp) / "tiny") if args.tiny else args.model
        proc, url = start_server(model_spec, args.threads)
        try:
            model = httpx.get(url + "/models", headers=AUTH).json()["data"][0]["id"]
            normal_run(url, model, 4)  # warm-up
            alone = normal_run(url, model, args.max_tokens)
            stop, results = multiprocessing.Event(), multiprocessing.Queue()
            hostile = multiprocessing.Process(target=hostile_client, args=(url, model, stop, results))
            hostile.start()
            time.sleep(1.0)  # the hostile requests are already arriving when the chats start
            under = normal_run(url, model, args.max_tokens)
            stop.set()
            answers = results.get(timeout=120)
            hostile.join(timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    pct = lambda xs, q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    print(f"16 streamed chats x {args.max_tokens} new tokens, model {model}")
    print(f"{'':24}{'p50 s':>8}{'p95 s':>8}")
    for name, lat in (("alone", alone), ("under hostile traffic", under)):
        print(f"{name:24}{statistics.median(lat):>8.2f}{pct(lat, 0.95):>8.2f}")
    ratio = pct(under, 0.95) / pct(alone, 0.95)
    print(f"p95 ratio: {ratio:.2f} (must be at most 2.0); all 32 normal chats completed")
    print("hostile requests sent, by kind and answer:")
    for (kind, status), count in sorted(answers.items(), key=lambda kv: kv[0][0]):
        print(f"  {kind:36} {status!s:>5} x{count}")
    server_errors = [k for (k, s) in answers if not isinstance(s, int) or s >= 500]
    if server_errors or ratio > 2.0:
        raise SystemExit(f"FAILED: 5xx or no answer for {sorted(set(server_errors))}; p95 ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
