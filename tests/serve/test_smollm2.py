"""The real SmolLM2 behind the live server: a right answer that stops at end of turn, and
an adapter batched with the base model giving what it gives alone."""

from __future__ import annotations

import threading

import pytest
from openai import OpenAI
from serve_helpers import live_server, make_adapter

from tunesmith.generate.engine import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_answers_and_adapters_do_not_cross_talk(smollm2, tmp_path):
    from tunesmith.serve.app import create_app
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.settings import Settings

    adapter = make_adapter(smollm2, tmp_path / "tuned", seed=1, scale=0.02)
    engine = LocalEngine.load("smollm2-135m-instruct", [("tuned", adapter)])
    try:
        prompt = engine.render_chat(QUESTION)
        alone = engine.generate(prompt, "tuned", SamplingParams(8, 0.0))
        with live_server(create_app(engine, Settings(home=tmp_path, api_key=None))) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
            tuned: dict = {}
            thread = threading.Thread(target=lambda: tuned.update(r=client.chat.completions.create(
                model="tuned", messages=QUESTION, max_tokens=8, temperature=0)))
            thread.start()
            base = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                                  max_tokens=24, temperature=0)
            thread.join()
        assert "Paris" in base.choices[0].message.content and base.choices[0].finish_reason == "stop"
        assert "<|im_end|>" not in base.choices[0].message.content
        assert tuned["r"].choices[0].message.content == alone[0]
        assert engine.stats()["peak_rows"] == 2
    finally:
        engine.close()
