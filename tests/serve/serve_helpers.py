"""Helpers for the serving tests: LoRA adapters made with peft, a live uvicorn server on a
free loopback port (in a thread), waiting for the engine to go idle."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ADAPTERS = ("alpha", "beta", "gamma")


def make_adapter(base_dir: Path, out: Path, seed: int, scale: float = 0.5, base_sha: str | None = None) -> Path:
    """A LoRA adapter on base_dir with random non-zero lora_B (so adapters differ), saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)  # lora_A's init draws from the global RNG: same adapter whatever ran before
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    if base_sha:
        (out / "tunesmith_adapter.json").write_text(json.dumps({"base_model": {"name": "other", "sha256": base_sha}}))
    return out


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


def wait_until_idle(engine, timeout_s: float = 20.0) -> dict:
    deadline = time.time() + timeout_s
    while True:
        stats = engine.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.time() > deadline:
            return stats
        time.sleep(0.05)
