"""Load a model for inference, the one way eval, compare, the demo, serve and chat all do,
and the rules every inference forward pass shares: which token pads a batch, at which
precision it runs, how the base's weights are stored (fp32, or int8 with `weights="int8"`),
and where the CausalLM sits inside a peft wrapper.

    python -c "from tunesmith.models.inference import load_for_inference; \
m = load_for_inference('smollm2-135m-instruct', weights='int8'); print(m.name, m.base_id, m.weights)"
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import AdapterError, UsageError
from tunesmith.models.adapters import check_base, full_weights_dir, resolve_adapter
from tunesmith.models.int8 import quantize_frozen_linears
from tunesmith.models.registry import REGISTRY, identity, load_model, load_tokenizer, resolve_model
from tunesmith.runs import ADAPTER_WEIGHTS_FILE

PRECISIONS = ("auto", "fp32", "bf16")
WEIGHTS = ("fp32", "int8")
"""How the base's linear layers are stored for inference: fp32 as loaded, or int8 with one
scale per output channel (models/int8.py; adapters on it stay fp32)."""
ADAPTER = "adapter"
"""The name the adapter given to `load_for_inference` is loaded (and served) under."""


@dataclass
class LoadedModel:
    model: Any
    """The transformers CausalLM, in eval mode; a peft PeftModel once an adapter is on it."""
    tokenizer: Any
    name: str
    """The model as it was named: registry name, directory or .gguf path."""
    base_id: str
    """The id the base is served under: the registry name, else the directory's or file's
    last part (a model id with slashes cannot be used in /v1/models/{id})."""
    base_identity: dict[str, Any] = field(default_factory=dict)
    """Name and content hash, checked against every adapter put on this base."""
    adapter: Path | None = None
    """The adapter directory loaded under ADAPTER, if any."""
    weights: str = "fp32"
    """How the base's linear layers are stored: one of WEIGHTS."""
    merged: bool = False
    """The adapter is folded into the base's weights (`model` is a plain CausalLM)."""

    @property
    def model_id(self) -> str:
        """The model to generate with: the adapter when one is loaded unmerged, else the base."""
        return ADAPTER if self.adapter is not None and not self.merged else self.base_id


def load_for_inference(
    model: str | Path | None, adapter: str | Path | None = None, home: Path | None = None, weights: str = "fp32",
    merge: bool = False,
) -> LoadedModel:
    """Load a base model (registry name, HF directory or .gguf; None: the default) and
    optionally a trained adapter (a run directory or an adapter directory).

    merge=True folds the adapter into the base's fp32 weights (W + BA), for a model that
    serves this one adapter only (an evaluation): every forward then costs what the base's
    does, instead of the LoRA layers' extra matmuls and peft's per-layer dispatch. int8
    weights cannot take it; the adapter then stays unmerged.

    weights="int8" stores every linear layer of the base but the LM head as int8 before any
    adapter goes on it (models/int8.py); the LM head, embeddings, norms and adapters stay fp32.

    A full fine-tuning run given as the adapter (its folder holds whole weights) is loaded
    instead of the base, once its recorded base is checked to be this one: a job's
    evaluation stage and `tunesmith eval --adapter` take either kind of run.

    Refused before any weights load: a model without a chat template (every prompt is
    rendered with it, as in training), an adapter trained on another base, an adapter not
    saved as safetensors."""
    check_weights(weights)
    ref = resolve_model(model, home)
    full = full_weights_dir(adapter) if adapter is not None else None
    if full is not None:  # a full fine-tune of this base: its own weights are the model
        check_base(full, identity(ref))
        ref, adapter = resolve_model(str(full), home), None
    tokenizer = load_tokenizer(ref)
    if tokenizer.chat_template is None:
        raise UsageError(
            f"model '{ref.name}' has no chat template; tunesmith renders every prompt with it, as training does"
        )
    ident = identity(ref)
    adapter_dir = find_adapter(adapter, ident) if adapter is not None else None
    base_id = ref.name if ref.name in REGISTRY else Path(ref.gguf_file or ref.path).name.removesuffix(".gguf")
    lm = load_model(ref).eval().requires_grad_(False)
    if weights == "int8":
        quantize_frozen_linears(lm)
    merged = False
    if adapter_dir is not None:
        lm = put_adapter(lm, adapter_dir, ADAPTER, base_id)
        if merge and weights == "fp32":
            lm, merged = lm.merge_and_unload().eval(), True
    return LoadedModel(lm, tokenizer, ref.name, base_id, ident, adapter_dir, weights, merged)


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise UsageError(f"unknown --weights '{weights}'; accepted: {', '.join(WEIGHTS)}")


def find_adapter(path: str | Path, base_identity: dict[str, Any]) -> Path:
    """The adapter directory of a run or adapter directory, checked to load onto this base."""
    adapter_dir = resolve_adapter(path)
    if not (adapter_dir / ADAPTER_WEIGHTS_FILE).is_file():
        raise AdapterError(
            f"adapter '{adapter_dir}' has no {ADAPTER_WEIGHTS_FILE}; only safetensors adapters are "
            "loaded (re-save it with save_pretrained(..., safe_serialization=True))"
        )
    check_base(adapter_dir, base_identity)
    return adapter_dir


def put_adapter(model: Any, adapter_dir: Path, name: str, base_id: str) -> Any:
    """Load a LoRA adapter onto a model under `name`: the model wrapped in peft's PeftModel
    the first time, the same PeftModel with one adapter more after."""
    try:
        if hasattr(model, "peft_config"):
            model.load_adapter(str(adapter_dir), adapter_name=name)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"could not load adapter '{adapter_dir}' onto {base_id}: {exc}") from exc
    return model.eval()


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pad_id(tokenizer: Any) -> int:
    """The token a batch is padded with (always masked out): pad, else unknown, else end of text."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """"fp32" or "bf16". auto: bf16 autocast on a CUDA GPU with bf16, fp32 on a CPU.

    Not bf16 on a CPU even with AVX512-BF16/AMX: autocast casts the fp32 weights again at
    every forward, which made eval's generation 2.2x slower on the 2-core AMX machine (64
    banking77 rows, SmolLM2: 22.0 s in bf16, 10.0 s in fp32), and in bf16 a greedy answer
    depends on the rows it is batched with (rounding), so the server's answer to a request
    would change with the traffic around it. `bf16` still forces autocast."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision '{precision}'; accepted: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at `precision` (weights stay fp32; bf16 autocasts)."""
    import torch

    if resolve_precision(precision, device_type) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)
