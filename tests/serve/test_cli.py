"""`tunesmith chat` and `tunesmith serve` as a user runs them: each command once as the real
executable in a child process; refusals and the int8 chat through the same command line in
this process (tests/in_process.py), without a child's seconds of importing torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI
from in_process import run_tunesmith
from serve_helpers import free_port

from tunesmith.serve.chat import run_chat
from tunesmith.generate.engine import SamplingParams

TUNESMITH = [str(Path(sys.executable).parent / "tunesmith")]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_chat_with_a_pipe_prints_the_answer(tiny_model_dir, adapter_dirs, engine):
    question = "What is the capital of France?"
    proc = subprocess.run(
        TUNESMITH + ["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter_dirs["beta"]),
                     "--temperature", "0", "--max-tokens", "12"],
        input=question + "\n", capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ids = engine.render_chat([{"role": "user", "content": question}])
    want, _, _ = engine.generate(ids, "beta", SamplingParams(12, 0.0))
    assert proc.stdout == want + "\n"
    assert "Loading weights" not in proc.stderr  # transformers' load bar is not tunesmith's output


def test_chat_with_int8_weights_answers_as_the_int8_engine(tiny_model_dir, adapter_dirs):
    from tunesmith.generate.engine import LocalEngine

    question = "What is the capital of France?"
    proc = run_tunesmith("chat", "--model", tiny_model_dir, "--adapter", adapter_dirs["beta"],
                         "--temperature", "0", "--max-tokens", "12", "--weights", "int8", stdin=question + "\n")
    assert proc.returncode == 0, proc.stderr
    engine = LocalEngine.load(str(tiny_model_dir), [("beta", adapter_dirs["beta"])], weights="int8")
    try:
        ids = engine.render_chat([{"role": "user", "content": question}])
        want, _, _ = engine.generate(ids, "beta", SamplingParams(12, 0.0))
    finally:
        engine.close()
    assert proc.stdout == want + "\n"
    bad = run_tunesmith("chat", "--model", tiny_model_dir, "--weights", "fp16", stdin="hi\n")
    assert bad.returncode == 2 and "unknown --weights 'fp16'" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_without_input_says_so(tiny_model_dir):
    proc = run_tunesmith("chat", "--model", tiny_model_dir, stdin="")
    assert proc.returncode == 2 and "no question on standard input" in proc.stderr
    assert "Traceback" not in proc.stderr


class RecordingEngine:
    """The real engine, remembering each conversation it was asked to render."""

    def __init__(self, engine):
        self.engine, self.conversations = engine, []
        self.base_id, self.max_context = engine.base_id, engine.max_context

    def render_chat(self, messages, tools=None):
        self.conversations.append([dict(m) for m in messages])
        return self.engine.render_chat(messages)

    def submit(self, *args, **kwargs):
        return self.engine.submit(*args, **kwargs)


def test_interactive_chat_keeps_history_and_obeys_commands(engine):
    rec = RecordingEngine(engine)
    stdin = io.StringIO("hello\n/system Be brief.\nand again\n/reset\nfresh\n/bogus\n/exit\nnever read\n")
    out = io.StringIO()
    run_chat(rec, "alpha", stdin, out, interactive=True, temperature=0.0, max_tokens=4)
    first, second, third = rec.conversations
    assert first == [{"role": "user", "content": "hello"}]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[0]["content"] == "Be brief." and second[-1]["content"] == "and again"
    assert third == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fresh"}]
    text = out.getvalue()
    assert "(system message set)" in text and "(conversation cleared)" in text and "unknown command /bogus" in text
    assert stdin.readline() == "never read\n"  # /exit stopped reading


def test_serve_command_serves_base_and_adapters(tiny_model_dir, adapter_dirs, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        TUNESMITH + ["serve", "--model", str(tiny_model_dir), "--adapter", f"alpha={adapter_dirs['alpha']}",
                     "--port", str(port), "--api-key", "k", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny_model_dir.name, "alpha"]
        resp = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                              temperature=0)
        assert resp.usage.completion_tokens == 3
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"serving at http://127.0.0.1:{port}/v1" in output and "model 'alpha': adapter on" in output


def test_serve_rejects_a_bad_adapter_flag(tiny_model_dir):
    proc = run_tunesmith("serve", "--model", tiny_model_dir, "--adapter", "no-equals-sign")
    assert proc.returncode == 2 and "--adapter expects NAME=PATH" in proc.stderr


def test_serve_refuses_a_network_host_without_a_key(tiny_model_dir):
    proc = run_tunesmith("serve", "--model", tiny_model_dir, "--host", "0.0.0.0", env={"TUNESMITH_API_KEY": None})
    assert proc.returncode == 2 and "TUNESMITH_API_KEY" in proc.stderr and "--insecure-no-key" in proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr
