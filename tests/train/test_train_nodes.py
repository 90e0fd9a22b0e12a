"""`tunesmith train --nnodes --node-rank --rdzv-endpoint`: two "machines" on loopback, each
one launcher with one process, train the same weights as `--nproc 2` on one; bad flags get
one sentence."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    pairs = [("What is the capital of France?", "Paris."), ("How do I reset my password?", "Click on forgot password.")]
    rows = [{"messages": [{"role": "user", "content": f"{pairs[i % 2][0]} {i}"},
                          {"role": "assistant", "content": pairs[i % 2][1]}]} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_two_nodes_train_the_weights_of_nproc_2(tiny_model_dir, chat_file, tmp_path):
    from safetensors.torch import load_file

    args = ["--model", str(tiny_model_dir), "--data", str(chat_file), "--precision", "fp32", "--batch-size", "8",
            "--seed", "3", "--max-steps", "3"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = tmp_path / "nodes"
    launchers = [subprocess.Popen([*TUNESMITH, "train", *args, "--out", str(nodes), "--nnodes", "2", "--node-rank",
                                   str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
                 for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], [o[1][-2000:] for o in outputs]
    one = tmp_path / "one"
    proc = subprocess.run([*TUNESMITH, "train", *args, "--out", str(one), "--nproc", "2"], capture_output=True,
                          text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((nodes / "run.json").read_text())["resolved"]["world_size"] == 2
    a, b = load_file(str(nodes / "adapter" / "adapter_model.safetensors")), load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


@pytest.mark.parametrize("flags, says", [
    (["--nnodes", "2"], "--rdzv-endpoint None: give HOST:PORT of node 0"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2: with --nnodes 2 it is 0 to 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--ray-address", "auto"], "give one of them"),
])
def test_bad_node_flags_get_one_sentence(flags, says, tiny_model_dir, chat_file, tmp_path):
    proc = subprocess.run([*TUNESMITH, "train", "--model", str(tiny_model_dir), "--data", str(chat_file), "--out",
                           str(tmp_path / "r"), *flags], capture_output=True, text=True, env=_env())
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
