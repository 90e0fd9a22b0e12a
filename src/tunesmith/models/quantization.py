"""NF4 bases for QLoRA: load a base with its linear layers in 4 bits, or as training saw them.

QLoRA (`tunesmith train --method qlora`) trains a LoRA adapter on a base whose linear
layers are stored as bitsandbytes NF4 (4-bit NormalFloat, blocks of 64 weights, the block
scales themselves quantized to 8 bits: "double quantization") and dequantized to the
compute dtype inside every matmul. `load_nf4_model` loads such a base for training;
`load_nf4_dequantized` rebuilds, for export, the very weights training computed with,
dequantize(nf4(W)), as a plain model an adapter can be merged into.

bitsandbytes is an optional extra (`pip install 'tunesmith[gpu]'`) and is imported only
here, only when used.

    python -c "from tunesmith.models.quantization import nf4_problems; print(nf4_problems())"
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tunesmith.errors import UsageError

INSTALL_HINT = "pip install 'tunesmith[gpu]'"
NF4_RECORD = {"library": "bitsandbytes", "quant_type": "nf4", "double_quant": True, "blocksize": 64}
"""What a QLoRA run records about its base (plus the dtype it was loaded in); export reads it."""


def nf4_problems(require_cuda: bool = True) -> list[str]:
    """Why an NF4 base cannot be loaded here (empty when it can). Cheap: imports no bitsandbytes.

    require_cuda=False is for tests and for export: bitsandbytes 0.50 also quantizes and
    runs NF4 layers on CPU, slowly; training on CPU stays refused (`--method lora` is the
    better use of a CPU)."""
    import torch

    if require_cuda and not torch.cuda.is_available():
        return ["--method qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none: use --method lora"]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"NF4 quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}"]
    return []


def nf4_record(dtype: Any) -> dict[str, Any]:
    """The quantization a QLoRA run used, for tunesmith_adapter.json and run.json."""
    return {**NF4_RECORD, "dtype": str(dtype).replace("torch.", "")}


def bnb_config(compute_dtype: Any) -> Any:
    """NF4 with double quantization, matmuls in the compute dtype (bf16 where available)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4_RECORD["quant_type"],
        bnb_4bit_use_double_quant=NF4_RECORD["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_nf4_model(ref: Any, dtype: Any, device: Any) -> Any:
    """The base with every linear layer but the LM head as `bnb.nn.Linear4bit` on `device`.

    Weights are read in `dtype` and quantized as they load, layer by layer, so the full
    precision model never sits in GPU memory whole. Embeddings, norms and the LM head stay
    in `dtype`. Only safetensors folders: a GGUF base is refused by the caller.
    """
    from transformers import AutoModelForCausalLM

    if ref.is_gguf:
        raise UsageError(gguf_refusal(ref))
    return AutoModelForCausalLM.from_pretrained(
        str(ref.path), dtype=dtype, quantization_config=bnb_config(dtype), use_safetensors=True,
        device_map={"": device},
    )


def gguf_refusal(ref: Any) -> str:
    return (f"--method qlora quantizes a safetensors base as it loads, and '{ref.name}' is a GGUF file, whose "
            "weights are quantized already: use a registry model or a Hugging Face folder, or --method lora")


def load_nf4_dequantized(ref: Any, record: dict[str, Any]) -> Any:
    """The base as a QLoRA run trained on it: NF4-quantized as `record` says, dequantized, fp32.

    Quantizes on CUDA when there is one (as training did), else with bitsandbytes' CPU
    kernels, which round with the same midpoints between NF4 levels as the CUDA kernel.
    The dequantized weights are exactly those training's matmuls used (in the recorded
    dtype); widening them to fp32 for the merge is exact.
    """
    import torch

    problems = nf4_problems(require_cuda=False)
    if problems:
        raise UsageError(problems[0] + "; or merge into the original weights with --merge-base original")
    if any(record.get(k) != v for k, v in NF4_RECORD.items()):
        raise UsageError(f"the run's base quantization {record} is not the one tunesmith rebuilds ({NF4_RECORD}); "
                         "merge into the original weights with --merge-base original")
    dtype = getattr(torch, record.get("dtype", "bfloat16"))
    model = load_nf4_model(ref, dtype, torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    # transformers swaps each Linear4bit for a Linear holding dequantize_4bit(weight) and
    # drops the quantization config, leaving a plain model.
    model = model.dequantize()
    return model.to(device="cpu", dtype=torch.float32)
