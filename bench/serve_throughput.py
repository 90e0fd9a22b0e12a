"""Serving throughput: 16 concurrent chat requests against the same requests one at a time.

Starts `tunesmith serve` (SmolLM2 by default) on a free loopback port, or uses --url; sends
each request streaming through the official openai client and reports total generated
tokens/s, p50/p95 latency and time to first token (TTFT) for both runs.

    .venv/bin/python bench/serve_throughput.py --threads 1
    .venv/bin/python bench/serve_throughput.py --url http://127.0.0.1:8000/v1 --model support
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from openai import OpenAI

TOPICS = ["a cat", "the sea", "a robot", "a city at night", "an old library", "a mountain village",
          "a lost key", "the first snow", "a train journey", "a lighthouse", "a garden", "a storm",
          "a market", "a violin", "a desert", "a bakery"]


def one_request(client: OpenAI, model: str, topic: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0, "tokens": tokens}


def run(client: OpenAI, model: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    results: list[dict] = [{}] * n
    t0 = time.perf_counter()
    if concurrent:
        def work(i: int) -> None:
            results[i] = one_request(client, model, TOPICS[i % len(TOPICS)], max_tokens)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(n):
            results[i] = one_request(client, model, TOPICS[i % len(TOPICS)], max_tokens)
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    return {"requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(lat), "p95_latency_s": pct(lat, 0.95),
            "p50_ttft_s": statistics.median(ttft), "p95_ttft_s": pct(ttft, 0.95)}


def start_server(model: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "tunesmith"), "serve", "--model", model, "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TUNESMITH_API_KEY": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            client.models.list()
            return proc, url
        except Exception:
            if time.time() > deadline:
                proc.terminate()
                raise SystemExit("the server did not come up in 300 s")
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model to start, or the model id at --url.")
    ap.add_argument("--url", help="Use a running server instead of starting one.")
    ap.add_argument("--threads", type=int, help="--threads for the started server.")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    proc = None
    if args.url:
        url, model = args.url, args.model
    else:
        proc, url = start_server(args.model, args.threads)
        model = args.model
    try:
        client = OpenAI(base_url=url, api_key=os.environ.get("TUNESMITH_API_KEY") or "unused",
                        max_retries=0, timeout=3600)
        one_request(client, model, "warm-up", 4)
        print(f"{args.requests} requests x {args.max_tokens} new tokens, model {model}, server {url}")
        seq = run(client, model, args.requests, args.max_tokens, concurrent=False)
        con = run(client, model, args.requests, args.max_tokens, concurrent=True)
        print(f"{'':12}{'tokens':>8}{'wall s':>9}{'tok/s':>8}{'p50 lat':>9}{'p95 lat':>9}{'p50 ttft':>10}{'p95 ttft':>10}")
        for name, r in (("sequential", seq), ("concurrent", con)):
            print(f"{name:12}{r['tokens']:>8}{r['wall_s']:>9.1f}{r['tokens_per_s']:>8.1f}{r['p50_latency_s']:>9.2f}"
                  f"{r['p95_latency_s']:>9.2f}{r['p50_ttft_s']:>10.2f}{r['p95_ttft_s']:>10.2f}")
        print(f"speed-up: {con['tokens_per_s'] / seq['tokens_per_s']:.1f}x sequential throughput")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
