"""Weight-only int8 for a frozen base: `Int8Linear`, and `quantize_frozen_linears` to swap it in.

Each weight row (output channel) is stored as int8 with one fp32 scale, symmetric:
scale = max|W_row| / 127 (rounded to a bf16 value, so every kernel below uses the very
same scale), W_int8 = round(W / scale). A 576 x 1536 layer holds 0.9 MB instead of 3.5 MB.

The matmul y = x W^T runs two ways, chosen by what the call needs:
- with autograd on (training a LoRA adapter on a frozen int8 base): `_FrozenInt8MatMul`,
  which dequantizes the weight on the fly in the input's dtype, y = (x @ W_int8^T) * scale,
  and in backward computes only the input gradient, dx = (dy * scale) @ W_int8. The frozen
  weight gets no gradient; the LoRA path beside it is ordinary fp32 autograd.
- for inference (no autograd): up to PACKED_MAX_ROWS rows (decode steps), torch's int8
  weight kernel `_weight_int8pack_mm`, which reads a quarter of fp32's bytes; its
  activations are bf16 (its fp32 form was 4-60x slower than fp32 itself, measured in
  docs/benchmarks.md). Above that (prefill, eval's loss), the same sum written as
  dequantize + fp32 matmul with x and y rounded to bf16 as the kernel rounds them, so an
  answer does not depend on how many rows were decoded beside it.

The LM head is left in fp32 (see quantize_frozen_linears).

This module imports torch when imported: `Int8Linear` subclasses `torch.nn.Linear`, because
peft puts a LoRA adapter only on an nn.Linear (the server adds adapters to a base that is
already int8). Nothing else about nn.Linear is inherited: `__init__` builds the layer from
an existing one and `forward` is its own.

    python -c "import torch; from tunesmith.models.int8 import Int8Linear; \
l = torch.nn.Linear(64, 32); q = Int8Linear.from_linear(l); x = torch.randn(4, 64); \
print((q(x) - l(x)).abs().max().item(), q)"
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_MAX_ROWS = 16
"""Inference matmuls with at most this many rows use `_weight_int8pack_mm`. On the 2-core
machine (one thread, SmolLM2's shapes) it beat fp32 by 3x at one row, matched it at 16,
and lost at 32 and above, where a dequantized fp32 matmul is faster."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row), symmetric; the scale is a bf16 value."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16).float()
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class _FrozenInt8MatMul(torch.autograd.Function):
    """y = x @ (W_int8 * scale)^T, with the gradient to x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        # Per-row scales commute with the sum over the input dimension: scale the output.
        return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        weight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return (grad * scale.to(grad.dtype)) @ weight.to(grad.dtype), None, None


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale)^T for int8 `weight` [out, in], by the rule in the module docstring."""
    if torch.is_grad_enabled():
        return _FrozenInt8MatMul.apply(x, weight, scale)
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and rows <= PACKED_MAX_ROWS:
        flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, weight, scale.to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    xb = x.to(torch.bfloat16).float()
    y = F.linear(xb, weight.float()) * scale
    return y.to(torch.bfloat16).to(x.dtype)


class Int8Linear(torch.nn.Linear):
    """A frozen linear layer with int8 weights (`weight`, int8 [out, in]) and fp32 `scale` [out].

    `weight` stays a (frozen) Parameter so code that looks for a layer's weight (peft moving
    an adapter to the base's device) finds it; `Module.to(dtype)` leaves int8 tensors alone."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate an fp32 weight
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        q, scale = quantize_weight(linear.weight)
        return cls(linear.in_features, linear.out_features, q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.int8:
            # transformers' tie_weights() would put the fp32 embedding matrix back here.
            raise RuntimeError(f"Int8Linear's weight was replaced by a {self.weight.dtype} tensor")
        y = int8_matmul(x, self.weight, self.scale)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight this layer computes with."""
        return self.weight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


def quantize_frozen_linears(model: torch.nn.Module) -> int:
    """Swap, in place, every frozen `nn.Linear` of `model` but its LM head for an `Int8Linear`;
    return how many.

    Frozen: its weight does not require a gradient (freeze the whole model first for
    inference). A peft LoRA layer's own matrices (lora_A, lora_B, ...) are never swapped,
    frozen or not; the base layer it wraps is. The LM head stays as it is: in int8 it
    changed 7 of 48 greedy banking77 labels against fp32, and 1 of 48 with it left fp32
    (docs/benchmarks.md), since one scale per vocabulary row moves near-tied logits."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None

    def swap(module: torch.nn.Module) -> int:
        count = 0
        for name, child in module.named_children():
            if (isinstance(module, BaseTunerLayer) and name != "base_layer") or child is head:
                continue
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                setattr(module, name, Int8Linear.from_linear(child))
                count += 1
            else:
                count += swap(child)
        return count

    return swap(model)
