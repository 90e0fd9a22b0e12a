"""`tunesmith export`: merged HF directory and GGUF, checked by reloading them for real.

A run directory is built here the way training lays it out (peft adapter with random,
non-zero lora_B, run.json, tunesmith_adapter.json), on the tiny random Llama from conftest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPTS = [
    "What is the capital of France?",
    "I am still waiting on my card?",
    "The quick brown fox 0123456789 {}[]",
]


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_run(run: Path, base_dir: Path, seed: int = 1, r: int = 4, targets: tuple[str, ...] = ALL_LINEAR) -> Path:
    """A finished training run on `base_dir`: adapter/, checkpoints/step-000002/, run.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.models.registry import identity, resolve_model

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets),
    )
    torch.manual_seed(seed)  # before peft draws lora_A, so the run is the same every time
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # peft starts lora_B at zero: make the adapter matter
    ident = identity(resolve_model(str(base_dir)))
    for sub, step in (("adapter", 4), ("checkpoints/step-000002", 2)):
        if step == 2:
            with torch.no_grad():  # an earlier checkpoint differs from the final adapter
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(0.5)
        out = run / sub
        model.save_pretrained(str(out), safe_serialization=True)
        (out / "tunesmith_adapter.json").write_text(
            json.dumps({"base_model": ident, "method": "lora", "step": step})
        )
    (run / "run.json").write_text(json.dumps({"config": {"model": str(base_dir)}, "base_model": ident}))
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    return run


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def logits(model, tokenizer, prompts=PROMPTS):
    import torch

    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).logits[0].float())
    return rows


def base_plus_adapter(base_dir: Path, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def max_diff(a_rows, b_rows) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(a_rows, b_rows))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_model_dir)


def test_hf_export_logits_equal_base_plus_adapter(tiny_run, tiny_model_dir, tiny_tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.export import export_run

    before = tree_hash(tiny_run)
    result = export_run(tiny_run, format="hf", out=tmp_path / "hf", log=lambda _: None)
    assert tree_hash(tiny_run) == before, "export changed the run directory"
    assert (result.out / "model.safetensors").is_file() and (result.out / "config.json").is_file()
    assert not (result.out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(str(result.out), dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(result.out))
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    want = logits(base_plus_adapter(tiny_model_dir, tiny_run / "adapter"), tiny_tokenizer)
    got = logits(merged, tokenizer)
    assert max_diff(got, want) < 1e-3
    # The adapter must matter, or the comparison above proves nothing.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    assert max_diff(logits(base, tiny_tokenizer), want) > 1e-2
    meta = json.loads((result.out / "tunesmith_export.json").read_text())
    assert meta["adapter_meta"]["step"] == 4 and meta["format"] == "hf" and meta["dtype"] == "f32"


def test_hf_export_of_a_checkpoint_uses_that_checkpoint(tiny_run, tiny_model_dir, tiny_tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.models.export import export_run

    result = export_run(tiny_run, format="hf", checkpoint="step-2", dtype="bf16", out=tmp_path / "hf", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(str(result.out), use_safetensors=True)
    assert merged.dtype == torch.bfloat16
    want = logits(base_plus_adapter(tiny_model_dir, tiny_run / "checkpoints" / "step-000002"), tiny_tokenizer)
    assert max_diff(logits(merged.float().eval(), tiny_tokenizer), want) < 5e-2
    assert json.loads((result.out / "tunesmith_export.json").read_text())["adapter_meta"]["step"] == 2


def load_gguf(out: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf_file,) = [p.name for p in out.glob("*.gguf")]
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf_file, dtype=torch.float32).eval()
    return model, tokenizer, out / gguf_file


# Logits of the tiny model reach about 1.2; measured errors: f32 3e-7, f16 3e-4, bf16 3e-3,
# q8_0 1.1e-2 (leaving q/k unpermuted gives 3.4e-2).
@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-5), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_gguf_export_reads_back_with_transformers(tiny_run, tiny_model_dir, tiny_tokenizer, tmp_path, dtype, tolerance):
    from gguf import GGUFReader

    from tunesmith.models.export import export_run

    before = tree_hash(tiny_run)
    result = export_run(tiny_run, format="gguf", dtype=dtype, out=tmp_path / "gguf", log=lambda _: None)
    assert tree_hash(tiny_run) == before, "export changed the run directory"
    model, tokenizer, path = load_gguf(result.out)

    # Same tokens as training had, and the same chat template.
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    want = logits(base_plus_adapter(tiny_model_dir, tiny_run / "adapter"), tiny_tokenizer)
    got = logits(model, tokenizer)
    assert max_diff(got, want) < tolerance

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32, as llama.cpp expects
    assert types["blk.0.attn_q.weight"] == dtype.upper()
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"


def test_gguf_q_k_are_permuted_for_llama_cpp(tiny_run, tmp_path):
    """Without the rotary permutation transformers would undo on load, logits would differ;
    check the stored q rows directly too, against llama.cpp's reshape."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from tunesmith.models.export import export_run

    hf = export_run(tiny_run, format="hf", out=tmp_path / "hf", log=lambda _: None)
    gg = export_run(tiny_run, format="gguf", dtype="f32", out=tmp_path / "gguf", log=lambda _: None)
    q_hf = load_file(str(hf.out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    reader = GGUFReader(str(next(gg.out.glob("*.gguf"))))
    (q_gguf,) = [np.asarray(t.data) for t in reader.tensors if t.name == "blk.0.attn_q.weight"]
    n_head = 4
    expected = q_hf.reshape(n_head, 2, q_hf.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(q_hf.shape)
    assert not np.array_equal(q_gguf, q_hf)
    np.testing.assert_array_equal(q_gguf.reshape(q_hf.shape), expected)


def test_modelfile_has_chatml_template_system_and_stop(tiny_run, tmp_path):
    from tunesmith.models.export import export_run

    result = export_run(tiny_run, format="gguf", dtype="q8_0", out=tmp_path / "gguf", log=lambda _: None)
    text = (result.out / "Modelfile").read_text()
    assert f"FROM ./tiny-q8_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "<|im_start|>{{ .Role }}" in text
    assert result.warnings == []


def test_modelfile_without_chatml_has_no_template(tiny_tokenizer):
    import copy

    from tunesmith.models.ollama import build_modelfile

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, warning = build_modelfile("x.gguf", tok)
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "") and warning and "not ChatML" in warning


GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
	System   string
	Messages []Message
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var cases []Case
	json.NewDecoder(os.Stdin).Decode(&cases)
	tmpl := template.Must(template.New("m").Parse(string(src)))
	var out []string
	for _, c := range cases {
		var b []byte
		w := &buf{&b}
		if err := tmpl.Execute(w, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buf struct{ b *[]byte }

func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.mark.skipif(not any((Path(d) / "go").is_file() for d in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="needs the Go toolchain (apt-get install golang-go) to run the template as Ollama does")
def test_modelfile_template_renders_like_the_jinja_template_in_go(tiny_tokenizer, tmp_path):
    """Execute the TEMPLATE with Go's text/template (what Ollama uses) and compare it with the
    Jinja chat template, after Ollama's SYSTEM insertion, on several conversations."""
    from tunesmith.models.ollama import CHATML_GO_TEMPLATE, _PROBES, chatml_system_prompt

    _, default_system = chatml_system_prompt(tiny_tokenizer)
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(CHATML_GO_TEMPLATE)
    conversations = _PROBES + [[{"role": "user", "content": 'only {{ braces }} and "quotes"'}]]
    cases, wants = [], []
    for conversation in conversations:
        want = tiny_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # What Ollama does: SYSTEM goes first when the conversation has no system message...
        if conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": default_system}] + conversation
        system = "\n\n".join(m["content"] for m in conversation if m["role"] == "system")
        messages = [{"Role": m["role"], "Content": m["content"]} for m in conversation]
        cases.append({"System": system, "Messages": messages})  # current Ollama: in both
        wants.append(want)
        cases.append({"System": system, "Messages": [m for m in messages if m["Role"] != "system"]})  # older
        wants.append(want)
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"), GO111MODULE="off")
    proc = subprocess.run(
        ["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt")],
        input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)
    assert len(rendered) == len(wants)
    for go_text, want in zip(rendered, wants):
        assert go_text == want


def test_refusals_are_sentences_and_leave_nothing(tiny_run, tmp_path):
    from tunesmith.errors import UsageError
    from tunesmith.models.export import export_run

    with pytest.raises(UsageError, match="q8_0 is a GGUF quantization"):
        export_run(tiny_run, format="hf", dtype="q8_0", out=tmp_path / "a")
    with pytest.raises(UsageError, match="inside the run directory"):
        export_run(tiny_run, format="hf", out=tiny_run / "export")
    with pytest.raises(UsageError, match="no checkpoint step-7"):
        export_run(tiny_run, format="hf", checkpoint="step-7", out=tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not an empty folder") as info:
        export_run(tiny_run, format="onnx", out=tmp_path / "full")
    assert "--format 'onnx'" in str(info.value)  # every problem reported at once
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tiny_run / "export").exists()


def test_gguf_refuses_an_architecture_it_does_not_know(tmp_path, tiny_tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunesmith.errors import UsageError
    from tunesmith.models.export import export_run

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    base_dir = tmp_path / "qwen"
    Qwen2ForCausalLM(config).save_pretrained(str(base_dir), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(base_dir))
    run = make_run(tmp_path / "run", base_dir)
    with pytest.raises(UsageError, match="architecture is 'qwen2'.*--format hf"):
        export_run(run, format="gguf", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = export_run(run, format="hf", out=tmp_path / "out-hf", log=lambda _: None)  # hf still works
    assert (result.out / "model.safetensors").is_file()


def test_export_refuses_an_adapter_for_another_base(tiny_run, tmp_path):
    from tiny_model import save_tiny_model
    from tunesmith.errors import UsageError
    from tunesmith.models.export import export_run

    other = save_tiny_model(tmp_path / "other-base", seed=7)
    with pytest.raises(UsageError, match="was trained on base model"):
        export_run(tiny_run, format="hf", model=str(other), out=tmp_path / "x")


def test_cli_export_prints_where_and_size(tiny_run, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cli = [sys.executable, "-c", "from tunesmith.cli import main; main()"]
    proc = subprocess.run(
        cli + ["export", str(tiny_run), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "g")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "g") in proc.stdout and "MB" in proc.stdout
    from in_process import run_tunesmith  # the refusal needs no second child importing torch

    bad = run_tunesmith("export", tiny_run, "--format", "hf", "--dtype", "q8_0", "--out", tmp_path / "h")
    assert bad.returncode == 2 and "error: cannot export" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_smollm2_gguf_q8_0_reads_back(smollm2, tmp_path):
    """The real SmolLM2 with a small random adapter, exported as q8_0 and read back."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.models.export import export_run

    # Attention only (q and k carry the rotary permutation): fewer layers to merge, same checks.
    run = make_run(tmp_path / "smol-run", smollm2, r=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    before = tree_hash(run)
    result = export_run(run, format="gguf", dtype="q8_0", out=tmp_path / "gguf", log=lambda _: None)
    assert tree_hash(run) == before
    reference = AutoTokenizer.from_pretrained(str(smollm2))
    chat = reference.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    want = logits(base_plus_adapter(smollm2, run / "adapter"), reference, [chat])
    model, tokenizer, path = load_gguf(result.out)
    assert tokenizer.chat_template == reference.chat_template
    assert tokenizer(chat)["input_ids"] == reference(chat)["input_ids"]
    got = logits(model, tokenizer, [chat])
    scale = float(want[0].abs().max())
    print(f"q8_0 max logit error {max_diff(got, want):.4f} of max |logit| {scale:.2f}; file {path.stat().st_size / 1e6:.0f} MB")
    assert max_diff(got, want) < 0.05 * scale
    assert (got[0].argmax(-1) == want[0].argmax(-1)).float().mean() >= 0.9
    assert path.stat().st_size < 200e6  # q8_0: about a byte per weight, not fp32's four
    assert torch.isfinite(got[0]).all()


def test_tokenizer_saved_with_the_adapter_wins(tiny_run, tmp_path):
    """When training saved its tokenizer (e.g. with a changed chat template) beside the
    adapter, the export carries that one, not the base model's."""
    import shutil

    from tiny_model import build_tiny_tokenizer
    from transformers import AutoTokenizer

    from tunesmith.models.export import export_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    tok = build_tiny_tokenizer()
    tok.chat_template = tok.chat_template.replace("named SmolLM", "named Banker")
    tok.save_pretrained(str(run / "adapter"))
    hf = export_run(run, format="hf", out=tmp_path / "hf", log=lambda _: None)
    assert "named Banker" in AutoTokenizer.from_pretrained(str(hf.out)).chat_template
    gg = export_run(run, format="gguf", out=tmp_path / "gguf", log=lambda _: None)
    _, gguf_tok, _ = load_gguf(gg.out)
    assert "named Banker" in gguf_tok.chat_template
    assert 'SYSTEM """You are a helpful AI assistant named Banker' in (gg.out / "Modelfile").read_text()


def test_gguf_untied_embeddings_write_output_weight(tmp_path, tiny_tokenizer):
    import torch
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models.export import export_run

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
    )
    base_dir = tmp_path / "untied"
    LlamaForCausalLM(config).save_pretrained(str(base_dir), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(base_dir))
    run = make_run(tmp_path / "run", base_dir)
    result = export_run(run, format="gguf", dtype="f32", out=tmp_path / "gguf", log=lambda _: None)
    model, tokenizer, path = load_gguf(result.out)
    assert "output.weight" in {t.name for t in GGUFReader(str(path)).tensors}
    want = logits(base_plus_adapter(base_dir, run / "adapter"), tiny_tokenizer)
    assert max_diff(logits(model, tokenizer), want) < 1e-5


def test_merge_base_is_only_for_qlora_runs(tiny_run, tmp_path):
    from tunesmith.errors import UsageError
    from tunesmith.models.export import export_run

    with pytest.raises(UsageError, match="--merge-base applies to QLoRA runs"):
        export_run(tiny_run, format="hf", out=tmp_path / "out", merge_base="nf4", log=lambda _: None)
    with pytest.raises(UsageError, match="--merge-base 'nf5' is not one of nf4, original"):
        export_run(tiny_run, format="hf", out=tmp_path / "out", merge_base="nf5", log=lambda _: None)
    assert not (tmp_path / "out").exists()
