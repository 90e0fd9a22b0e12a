"""What this machine computes with: the CPU class (or CUDA), and the training precision it implies.

One class per kind of matmul hardware, because that is what sets LoRA training speed here
(docs/benchmarks.md has one table per class):

    CUDA          a CUDA GPU (bf16 where `torch.cuda.is_bf16_supported()`)
    AMX           Intel AMX tiles (amx_bf16): bf16 matmuls ~5x fp32
    AVX512-BF16   AVX-512 with bf16 dot products: bf16 matmuls ~5x fp32
    AVX2          no bf16 instructions: bf16 is emulated and slower than fp32, so fp32
    other         anything else (ARM, old x86): fp32

oneDNN and ATen can be held below what the CPU has (`ONEDNN_MAX_CPU_ISA=AVX2`,
`ATEN_CPU_CAPABILITY=avx2`, as people do to reproduce an AVX2-only machine); the class then
follows the cap, since the kernels do.

    python -c "from tunesmith.models.hardware import detect_machine; print(detect_machine().describe())"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunesmith.models.speed import cpu_name

BF16_CLASSES = ("AMX", "AVX512-BF16")
ISA_CAPS_BELOW_BF16 = {
    # env var -> values that keep the kernels below AVX512-BF16 (case-insensitive)
    "ONEDNN_MAX_CPU_ISA": ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"),
    "DNNL_MAX_CPU_ISA": ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"),
    "ATEN_CPU_CAPABILITY": ("default", "avx2"),
}


@dataclass(frozen=True)
class Machine:
    """The compute this process sees. `cpu_class` is one of CUDA, AMX, AVX512-BF16, AVX2, other."""

    cpu_class: str
    name: str
    threads: int
    bf16: bool
    capped_by: str | None = None  # the env var that holds the kernels below the CPU's own class

    def describe(self) -> str:
        cap = f", capped by {self.capped_by}" if self.capped_by else ""
        unit = "" if self.cpu_class == "CUDA" else f", {self.threads} threads"
        return f"{self.cpu_class} ({self.name}{unit}{cap})"

    def to_dict(self) -> dict[str, object]:
        return {"class": self.cpu_class, "name": self.name, "threads": self.threads, "bf16": self.bf16,
                **({"capped_by": self.capped_by} if self.capped_by else {})}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_class(flags: set[str], env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """The class the CPU's flags give, lowered by an ISA cap in `env`; returns (class, cap)."""
    env = dict(os.environ) if env is None else env
    if "amx_bf16" in flags:
        own = "AMX"
    elif "avx512_bf16" in flags:
        own = "AVX512-BF16"
    elif "avx2" in flags:
        own = "AVX2"
    else:
        own = "other"
    if own in BF16_CLASSES:
        for var, below in ISA_CAPS_BELOW_BF16.items():
            if env.get(var, "").strip().lower() in below:
                return ("AVX2" if "avx2" in flags else "other"), f"{var}={env[var]}"
    return own, None


def detect_machine() -> Machine:
    """The machine as the kernels see it (imports torch)."""
    import torch

    if torch.cuda.is_available():
        return Machine("CUDA", torch.cuda.get_device_name(0), torch.get_num_threads(), torch.cuda.is_bf16_supported())
    klass, cap = cpu_class(cpu_flags())
    return Machine(klass, cpu_name(), torch.get_num_threads(), klass in BF16_CLASSES, cap)


def precision_reason(machine: Machine, setting: str, chosen: str) -> str:
    """One sentence: why training runs in `chosen` ("bf16" or "fp32") for --precision `setting`."""
    if setting != "auto":
        return f"--precision {setting}"
    if chosen == "bf16":
        return f"{machine.cpu_class} has fast bf16 matmuls"
    if machine.cpu_class == "CUDA":
        return "this GPU has no bf16"
    return f"{machine.cpu_class} has no bf16 matmul instructions (emulated bf16 is slower than fp32)"
