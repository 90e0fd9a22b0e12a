"""Load `tunesmith export` GGUF files in llama.cpp itself and compare with transformers.

Not part of the test suite: llama-cpp-python has no wheel on the package registry for this
machine, so it is built from source (about 30 minutes on 2 busy cores):

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
      .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    .venv/bin/python bench/export_llamacpp_check.py exports/run-hf exports/run-gguf/run-f16.gguf

The first argument is an `--format hf` export of the same run (the merged model in fp32):
it gives the reference tokens, logits and greedy answer. One JSON line per GGUF file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(hf_dir: Path, ggufs: list[str]) -> None:
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        answer = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0][len(ids):]
    answer_text = tok.decode(answer, skip_special_tokens=True)
    for path in ggufs:
        llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        text = llm.create_completion(prompt, max_tokens=20, temperature=0.0, top_k=1)["choices"][0]["text"]
        print(json.dumps({
            "file": Path(path).name,
            "same_tokens": llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids,
            "chat_template_same": llm.metadata.get("tokenizer.chat_template") == tok.chat_template,
            "max_logit_error": round(float(np.abs(got - ref).max()), 4),
            "max_abs_logit": round(float(np.abs(ref).max()), 2),
            "argmax_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 3),
            "greedy": text,
            "greedy_same_as_transformers": text == answer_text,
        }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
