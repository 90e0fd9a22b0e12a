"""The model side of training: build base + adapter, pick precision, compute the loss.

Speed levers, all here: the frozen base is cast to bf16 once (LoRA weights and optimizer
state stay fp32); packed batches go through `packed_attention`, which runs causal
attention per example inside one padding-free row; the LM head and cross-entropy run only
at positions that carry a label.

    python -c "from tunesmith.train.model import precision_dtype; print(precision_dtype('auto'))"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import UsageError
from tunesmith.models.adapters import check_base, resolve_adapter
from tunesmith.models.hardware import detect_machine
from tunesmith.models.inference import causal_lm
from tunesmith.models.quantization import gguf_refusal, load_nf4_model, nf4_problems
from tunesmith.models.registry import load_model
from tunesmith.runs import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_WEIGHTS_FILE

PACKED_ATTENTION = "tunesmith_packed"
# Model types whose attention is plain causal softmax attention over all earlier tokens,
# so running it per example is exact. Others (sliding windows, soft-capping, attention
# sinks) are refused for packing rather than silently mixing examples.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def has_bf16() -> bool:
    """Whether bf16 matmuls are fast here: CUDA with bf16, or a CPU class with AVX512-BF16/AMX
    (an ISA cap such as ONEDNN_MAX_CPU_ISA=AVX2 counts: the kernels follow it)."""
    return detect_machine().bf16


def precision_dtype(precision: str) -> Any:
    """The compute dtype for --precision (auto: bf16 where the hardware has it)."""
    import torch

    if precision == "bf16" or (precision == "auto" and has_bf16()):
        return torch.bfloat16
    return torch.float32


GROUPED_ATTENTION_MAX_LEN = 192
"""On the CPU, packed examples up to this many tokens use `grouped_causal_attention`;
longer ones use torch's SDPA (flash) kernel. Measured on the 2-core machine (bf16, 9 query
and 3 key/value heads, forward + backward, ~1,000 tokens of examples): 15 vs 40 ms at 60
tokens, 29 vs 54 at 128, 58 vs 47 at 256; torch's CPU flash backward has a large fixed cost
per row, and the explicit form keeps an [L, L] score matrix per head, which only pays for
short rows (bench/train_step_profile.py --ab sdpa)."""


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     pack_index=None, unpack_index=None, **kwargs):
    """Causal attention inside each example of a packed row, all examples in one call.

    query/key/value are [1, heads, total_tokens, head_dim]. `pack_index` [examples, longest]
    gathers each example's tokens into its own right-padded row; causal attention there
    lets a token see only earlier tokens of its own example (padding lies after every real
    token, so no real token sees it); `unpack_index` takes the real rows back out. The
    linear layers, where the FLOPs are, still run on the padding-free row.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if pack_index is None or unpack_index is None:
        raise RuntimeError("packed attention needs pack_index and unpack_index (see train.data.collate)")
    examples, longest = pack_index.shape
    flat_index = pack_index.reshape(-1)

    def rows(x):  # [1, H, T, D] -> [examples, H, longest, D]; index_select: its backward is a cheap index_add
        return x[0].index_select(1, flat_index).unflatten(1, (examples, longest)).transpose(0, 1)

    if query.device.type == "cpu" and longest <= GROUPED_ATTENTION_MAX_LEN:
        out = grouped_causal_attention(rows(query), rows(key), rows(value), scaling, dropout)
    else:
        out, _ = sdpa_attention_forward(module, rows(query), rows(key), rows(value), None,
                                        dropout=dropout, scaling=scaling, is_causal=True)
    # out: [examples, longest, H, D] -> the packed row [1, T, H, D]
    return out.reshape(-1, *out.shape[2:]).index_select(0, unpack_index).unsqueeze(0), None


def grouped_causal_attention(query, key, value, scaling=None, dropout=0.0):
    """softmax(q k^T * scaling + causal mask) v, written out, with grouped key/value heads.

    query [B, H, L, D]; key/value [B, KV, L, D], query head h reading key/value head
    h // (H / KV) as transformers' repeat_kv does. The query heads of a group are stacked
    into one matrix, so each key/value head is multiplied once (no repeated copies).
    Softmax in fp32. Returns [B, L, H, D], the layout attention functions hand back.
    """
    import torch
    import torch.nn.functional as F

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    scores = torch.matmul(query.reshape(batch, kv_heads, group * length, dim), key.transpose(-1, -2))
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.view(batch, kv_heads, group, length, length).masked_fill(future, float("-inf"))
    probs = torch.softmax(scores * scale, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(batch, kv_heads, group * length, length), value)
    return out.view(batch, heads, length, dim).transpose(1, 2)


def check_packable(config: Any, max_seq_len: int) -> None:
    sliding = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        sliding = None
    if config.model_type not in PACKABLE_MODEL_TYPES or (sliding is not None and sliding < max_seq_len):
        raise UsageError(
            f"packing is not supported for model type '{config.model_type}'"
            + (f" with a sliding window of {sliding}" if sliding else "")
            + f" (exact per-example attention is guaranteed for {', '.join(PACKABLE_MODEL_TYPES)}); pass --no-packing"
        )


def use_packed_attention(model: Any, max_seq_len: int) -> None:
    """Switch a model to per-example attention for packed rows (refused where not exact)."""
    from transformers import AttentionInterface

    check_packable(model.config, max_seq_len)
    # Registering under our own name adds an entry to transformers' table of attention
    # functions; it changes no existing entry and no library method.
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    model.set_attn_implementation(PACKED_ATTENTION)


def build_model(ref: Any, cfg: Any, compute_dtype: Any, *, qlora_needs_cuda: bool = True) -> Any:
    """The base model with the method applied, its trainable parameters in fp32.

    LoRA (and DPO, which trains a LoRA adapter): base weights in the compute dtype (cast
    once, here), adapters via peft.
    QLoRA: the same, with the base's linear layers stored in 4-bit NF4 (see load_qlora_base).
    Full: all weights fp32 (bf16 runs under autocast).
    qlora_needs_cuda=False lets tests build a QLoRA model with bitsandbytes' CPU kernels;
    the command never passes it.
    """
    import torch

    if cfg.method == "qlora":
        model = load_qlora_base(ref, cfg, compute_dtype, require_cuda=qlora_needs_cuda)
    else:
        model = load_model(ref, dtype=torch.float32 if cfg.method == "full" else compute_dtype)
    if cfg.packing:
        use_packed_attention(model, cfg.max_seq_len)
    else:
        model.set_attn_implementation("sdpa")
    model.config.use_cache = False
    if cfg.method == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=layer_linears(model) if cfg.lora_layers and cfg.lora_target_modules == "all-linear"
        else cfg.lora_target_modules,
        layers_to_transform=top_layers(model, cfg.lora_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise UsageError(f"--lora-target-modules {cfg.lora_target_modules}: {exc}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if compute_dtype != torch.float32:
        set_input_casting(model, False)
    model.train()
    return model


def top_layers(model: Any, count: int | None) -> list[int] | None:
    """Indices of the last `count` decoder layers (None: all of them get LoRA).

    Nothing below the lowest adapted layer needs a gradient, so autograd records no graph
    there: backward stops at that layer, and the layers under it cost only their forward
    (~2 of the ~4 FLOPs per parameter and token a LoRA step costs)."""
    if count is None:
        return None
    total = model.config.num_hidden_layers
    if count > total:
        raise UsageError(f"--lora-layers {count}: {model.config.model_type} has {total} decoder layers; "
                         f"give 1 to {total} or leave it out for all")
    return list(range(total - count, total))


def layer_linears(model: Any) -> list[str]:
    """The names of the linear layers inside the decoder layers (what all-linear adapts there):
    peft takes a layer selection only with named target modules."""
    import torch

    layers = getattr(model, model.base_model_prefix).layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)})


COMPILE_MIN_TOKENS = 100_000
"""`--compile auto` compiles runs that train at least this many tokens: compiling SmolLM2's
layers took 70-80 s on the 2-core CPU with an empty inductor cache (a few seconds with a warm
one) and made steps 1.3-1.5x faster (bench/train_throughput.py), so it pays for itself after
three to four minutes of eager training (~100,000 tokens at ~500 tokens/s). That gain is bf16's:
in fp32 on an AVX2-only CPU compiled steps were slower than eager (73 against 86 tokens/s,
issue 24), so auto never compiles fp32 training on a CPU."""

COMPILED_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def compile_toolchain_missing(device: str) -> str | None:
    """Why torch.compile can't run here (None when it can): inductor builds C++ on the CPU
    and triton kernels on CUDA."""
    import importlib.util
    import os
    import shutil

    if device.startswith("cuda"):
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    if any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return None
    return "no C++ compiler (g++ or clang++) on PATH"


def should_compile(setting: str, tokens_to_train: float, device: str, fsdp: bool, quantized: bool = False,
                   fp32: bool = False) -> bool:
    """Resolve --compile: on and off are obeyed (on refuses what can't work), auto decides.
    Not with FSDP-sharded weights nor bitsandbytes 4-bit layers (qlora): untested there; not
    auto for fp32 training on a CPU (`fp32`), where compiled steps measured slower."""
    if setting == "off":
        return False
    missing = compile_toolchain_missing(device)
    if setting == "on":
        if fsdp:
            raise UsageError("--compile on does not combine with --distributed-strategy fsdp; use --compile off")
        if quantized:
            raise UsageError("--compile on does not combine with --method qlora; use --compile off")
        if missing:
            raise UsageError(f"--compile on needs torch.compile's toolchain, and here {missing}; use --compile off")
        return True
    if fp32 and not device.startswith("cuda"):
        return False
    return not fsdp and not quantized and missing is None and tokens_to_train >= COMPILE_MIN_TOKENS


def compile_layers(model: Any) -> int:
    """torch.compile the attention, MLP and norms of every decoder layer (regional compilation:
    the layers share one compiled graph, so compiling costs one layer's time, not thirty).

    The decoder layer's own call stays eager, so the stop checks hooked on it (add_stop_checks)
    keep running in Python. Shapes are dynamic from the start: every packed step has another
    length. Returns how many modules were compiled.
    """
    lm = causal_lm(model)
    # With frozen embeddings the first layer's input needs no gradient and every later one
    # does; compiled code specialises on that, so the first layer would compile a second
    # graph. Asking for the (cheap, discarded) gradient of the embeddings' output gives
    # every layer the same input and one graph.
    layers = getattr(lm, lm.base_model_prefix).layers
    if any(p.requires_grad for p in layers[0].parameters()):  # with --lora-layers backward stops higher up
        lm.enable_input_require_grads()
    count = 0
    for layer in layers:
        for name in COMPILED_PARTS:
            part = getattr(layer, name, None)
            if part is not None:
                part.compile(dynamic=True)
                count += 1
    return count


def check_qlora(cfg: Any, ref: Any, world_size: int = 1, require_cuda: bool = True) -> None:
    """Refuse, before anything is loaded or written, a QLoRA run that cannot work here."""

    problems = nf4_problems(require_cuda)
    if ref.is_gguf:
        problems.append(gguf_refusal(ref))
    if world_size > 1 and cfg.distributed_strategy == "fsdp":
        problems.append("--method qlora does not support --distributed-strategy fsdp (its 4-bit weights are not "
                        "sharded here); use --distributed-strategy ddp")
    if problems:
        raise UsageError("; ".join(problems))


def load_qlora_base(ref: Any, cfg: Any, compute_dtype: Any, require_cuda: bool = True) -> Any:
    """The base for QLoRA: linear layers in NF4 on this process's device, the rest in the compute dtype.

    peft's `prepare_model_for_kbit_training` is deliberately not called. It does three
    things: freezes the base (get_peft_model does that too); casts every weight that is not
    4-bit (embeddings, norms, LM head) to fp32, a guard for fp16 training; and turns on
    gradient checkpointing. The cast is not wanted here: compute is bf16 under autocast
    (fp32's exponent range, and the norms upcast internally), so fp32 copies only cost
    memory, which is what QLoRA is for (SmolLM2's embeddings: 113 MB in fp32 against 57 MB
    in bf16, beside about 55 MB for all its NF4 linear layers), plus a cast back to bf16
    in every matmul. --method lora keeps its frozen base in bf16 for the same reasons.
    Gradient checkpointing trades about a third more compute for activation memory; that
    is independent of how the base is stored, --micro-batch-size already bounds activation
    memory without recomputing, and leaving it off keeps qlora and lora different in one
    thing only.
    """
    import torch

    check_qlora(cfg, ref, require_cuda=require_cuda)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return load_nf4_model(ref, compute_dtype, device)


def set_input_casting(model: Any, enabled: bool) -> None:
    """Whether peft's LoRA layers cast their (bf16) input to the fp32 LoRA weights' dtype.

    Under bf16 autocast that cast is wasted work: the LoRA matmuls cast the input straight
    back to bf16, and the fp32 copy was an exact widening, so the result is the same bit
    for bit. Off, it saves two activation-sized copies per LoRA layer in forward and two in
    backward (210 layers for SmolLM2 with all-linear LoRA). This is the attribute peft's own
    `peft.helpers.disable_input_dtype_casting` sets, held for the whole run.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def forward_loss(model: Any, batch: dict[str, Any], compute_dtype: Any) -> tuple[Any, int, Any]:
    """(sum of token cross-entropies, number of target tokens, number predicted right).

    The backbone gives hidden states; only those at positions with a target go through
    the LM head, so the vocabulary-sized matmul is done for trained tokens only.
    """
    import torch
    import torch.nn.functional as F

    lm = causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    targets = batch["targets"]
    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask", "pack_index", "unpack_index") if k in batch}
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state
        keep = targets != -100
        logits = lm.get_output_embeddings()(hidden[keep])
    logits = logits.float()
    wanted = targets[keep]
    loss_sum = F.cross_entropy(logits, wanted, reduction="sum")
    correct = (logits.detach().argmax(-1) == wanted).sum()
    return loss_sum, int(wanted.numel()), correct


def parameter_count(model: Any) -> int:
    """All parameters; a 4-bit weight stores two per byte, so it counts 2 x its bytes."""
    return sum(p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def add_stop_checks(model: Any, check: Any) -> list[Any]:
    """Call `check()` before every decoder layer's forward and after its backward, so a stop
    request (Ctrl-C, SIGTERM) is noticed within one layer instead of one whole step.

    Backward runs in C++ without returning to Python, so a signal handler alone would wait
    for the end of it; a gradient hook on each layer's output gives Python (and `check`)
    a turn per layer. `check` raises to abandon the step. Returns the hook handles.
    """
    layers = getattr(getattr(causal_lm(model), causal_lm(model).base_model_prefix), "layers", None)
    if layers is None:
        return []

    def before(_module, _args):
        check()

    def after(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: (check(), grad)[1])

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after))
    return handles


def shard_model(model: Any) -> None:
    """FSDP2: shard each decoder layer over the default process group.

    Each layer is its own all-gather unit, so only one layer's full weights exist at a
    time. The embeddings, final norm and LM head stay whole on every process: the LM head
    is often tied to the embeddings (one weight in two places), and forward_loss calls the
    backbone and the head separately; their gradients (full fine-tuning) are summed by hand
    in run._sum_over_processes. Gradients are summed, not averaged: the loss is already
    divided by the whole step's trained-token count over all processes.
    """
    from torch.distributed.fsdp import fully_shard

    lm = causal_lm(model)
    for layer in getattr(lm, lm.base_model_prefix).layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def full_tensor(t: Any) -> Any:
    """The whole tensor behind a sharded one (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: Any, target: Any) -> Any:
    """`full` laid out as `target` is: this process's shard when target is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(dtype=target.dtype)
    if isinstance(target, DTensor):
        return distribute_tensor(full, target.device_mesh, target.placements)
    return full.to(target.device)


# ----------------------------------------------------------------------------- --init-adapter


def resolve_init_adapter(path: Path, base_identity: dict[str, Any]) -> Path:
    """The LoRA adapter directory --init-adapter names, checked against the base model."""

    path = Path(path)
    if (path / ADAPTER_DIR / "config.json").is_file() or (path / "config.json").is_file():
        raise UsageError(f"--init-adapter {path} is a full fine-tuning run (a whole model, not an adapter); "
                         "--init-adapter continues a LoRA adapter: give the model itself as --model instead")
    try:
        adapter = resolve_adapter(path)
        check_base(adapter, base_identity)
    except UsageError as exc:
        raise UsageError(f"--init-adapter: {exc}") from None
    peft_type = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text()).get("peft_type")
    if peft_type != "LORA":
        raise UsageError(f"--init-adapter {path}: {adapter} is a {peft_type} adapter; "
                         "--init-adapter continues LoRA adapters")
    return adapter


def with_adapter_shape(cfg: Any, adapter: Path) -> Any:
    """The config with the init adapter's LoRA rank, alpha and target modules (the adapter
    trained from it must have its shape); a different value given explicitly is refused."""
    saved = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    targets = saved["target_modules"]
    shape = {"lora_rank": int(saved["r"]), "lora_alpha": float(saved["lora_alpha"]),
             "lora_target_modules": sorted(targets) if isinstance(targets, list) else targets}
    fields = type(cfg).model_fields
    clashes = []
    for key, value in shape.items():
        given = getattr(cfg, key)
        same = sorted(given) == value if isinstance(given, list) and isinstance(value, list) else given == value
        if given != fields[key].default and not same:
            clashes.append(f"--{key.replace('_', '-')} {given if not isinstance(given, list) else ','.join(given)} "
                           f"(the adapter has {value if not isinstance(value, list) else ','.join(value)})")
    if clashes:
        raise UsageError(f"--init-adapter {adapter} fixes the adapter's shape, which training continues: "
                         + "; ".join(clashes) + "; leave these options out")
    return cfg.model_copy(update=shape)


def load_adapter_weights(model: Any, adapter: Path) -> None:
    """Copy the init adapter's LoRA weights (safetensors) into the freshly built adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(adapter / ADAPTER_WEIGHTS_FILE)))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    bad = [k for k in result.unexpected_keys if "lora_" in k] + [k for k in result.missing_keys if k in lora]
    if bad:
        raise UsageError(f"--init-adapter {adapter} does not fit this model (weights {bad[:3]}); check --model")


def load_frozen_adapter(model: Any, adapter: Path, name: str) -> None:
    """Load a LoRA adapter beside the one being trained, as peft's adapter `name`: frozen
    (requires_grad False) and inactive until switched to with `model.set_adapter(name)`.

    Reinforcement's KL reference with --init-adapter: the adapter as training started, kept
    while the trained copy moves. It shares the base's weights (one more adapter's worth
    of memory, not a second model). Its weights are created empty and filled from the file,
    so loading it draws nothing from torch's RNG. Checkpoints leave it out
    (save_checkpoint's only_adapter)."""
    training = model.training
    result = model.load_adapter(str(adapter), adapter_name=name, is_trainable=False, low_cpu_mem_usage=True)
    model.train(training)  # peft's load_adapter leaves the model in eval mode
    if result.missing_keys:
        raise UsageError(f"--init-adapter {adapter} does not fit this model (weights {result.missing_keys[:3]} "
                         "missing); check --model")
