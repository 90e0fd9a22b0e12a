"""Write a merged Hugging Face Llama model as one GGUF file for llama.cpp, Ollama, LM Studio.

What llama.cpp's own converter (`convert_hf_to_gguf.py`) does for a Llama, done with the
`gguf` package: hyper-parameters under `llama.*`, tensors renamed to llama.cpp's
convention (`blk.N.attn_q.weight`, ...), the q/k projections permuted from Hugging Face's
rotary layout (halves) to llama.cpp's (interleaved pairs), norms kept in f32, and the
byte-level BPE tokenizer (tokens, merges, token types, special ids, chat template) in the
metadata. Anything it cannot write faithfully is refused up front by `check_gguf_exportable`.

    python -c "from tunesmith.models.gguf_writer import GGUF_DTYPES; print(GGUF_DTYPES)"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED_MODEL_TYPES = ("llama",)

# The pre-tokenizer regexes transformers' GGUF reader knows, by llama.cpp's name for them.
# Only names both sides agree on are written, so the file tokenizes the same everywhere.
_GPT2_PRE = "gpt-2"


def check_gguf_exportable(config: Any, tokenizer: Any) -> list[str]:
    """Reasons this model cannot be written as GGUF faithfully (empty when it can)."""
    problems: list[str] = []
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(
            f"the base model's architecture is '{model_type}', and the GGUF writer knows only "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; export it with --format hf instead"
        )
        return problems
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(
            f"rope scaling '{rope.get('rope_type')}' is not written by the GGUF writer "
            "(only plain rotary embeddings are); export with --format hf instead"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"the model has {flag}=true, which the GGUF writer does not write; use --format hf")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act '{config.hidden_act}' is not llama.cpp's Llama (silu); use --format hf")
    try:
        _tokenizer_model(tokenizer)
    except ValueError as exc:
        problems.append(str(exc))
    if len(tokenizer) > config.vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {config.vocab_size} rows"
        )
    return problems


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    dtype: str,
    name: str,
    log: Callable[[str], None] = print,
) -> None:
    """Write `model` (a merged LlamaForCausalLM) and its tokenizer to the GGUF file `path`."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    n_fallback = _add_tensors(writer, model, dtype)
    if n_fallback:
        log(f"{n_fallback} tensors have rows not divisible by 32 and were written in f16 instead of q8_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    if not rope and getattr(config, "rope_scaling", None):
        rope = dict(config.rope_scaling)
    rope = dict(rope)
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer: Any, config: Any) -> None:
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "the tokenizer is not a fast (tokenizers) tokenizer, so its vocabulary cannot be "
            "written as GGUF; use --format hf"
        )
    return json.loads(backend.to_str())


def _tokenizer_model(tokenizer: Any) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for a byte-level BPE tokenizer, else ValueError."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"the tokenizer is a {model.get('type')} model; the GGUF writer writes byte-level BPE "
            "(GPT-2 style) vocabularies only; use --format hf"
        )
    if spec.get("normalizer"):
        raise ValueError("the tokenizer has a normalizer, which GGUF's BPE tokenizer has no place for; use --format hf")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt2", _GPT2_PRE
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex")
        if (
            split.get("type") == "Split"
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
                if known == regex:
                    return "gpt2", name
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:160]}) is not one the GGUF writer can "
        "name for llama.cpp (GPT-2's byte-level split or a known regex split); use --format hf"
    )


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    from gguf import TokenType

    spec = _tokenizer_json(tokenizer)
    model_name, pre = _tokenizer_model(tokenizer)
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    tokens, token_types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types.get(i, TokenType.NORMAL))
        else:
            # Embedding rows beyond the tokenizer (padding to a multiple): llama.cpp's
            # converter names them the same way.
            tokens.append(f"[PAD{i}]")
            token_types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model(model_name)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    # Whether the tokenizer itself adds BOS/EOS to plain text (ChatML templates write their
    # own markers, so SmolLM2's adds neither); llama.cpp must do the same.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- tensors


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values


def _permute_rotary(weight: Any, n_head: int) -> Any:
    """Hugging Face's q/k rows (rotary halves) to llama.cpp's (interleaved pairs).

    The same reshape as llama.cpp's converter; transformers' GGUF reader undoes it on load.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensors(writer: Any, model: Any, dtype: str) -> int:
    """Add every weight under its llama.cpp name; returns how many fell back from q8_0 to f16."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_kv = config.num_key_value_heads or config.num_attention_heads
    state = model.state_dict()
    tied = "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    n_fallback = 0
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor '{hf_name}' has no llama.cpp name; the merged model is not a plain Llama")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_rotary(data, n_kv)
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif dtype == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        elif dtype == "bf16":
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif data.shape[-1] % 32 == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            # llama.cpp's converter does the same for rows q8_0's 32-wide blocks do not divide.
            writer.add_tensor(gguf_name, data.astype(np.float16))
            n_fallback += 1
    return n_fallback
