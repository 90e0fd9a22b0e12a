"""The CPU class and the precision reason (issue 24: say the machine)."""

from tunesmith.models.hardware import Machine, cpu_class, cpu_flags, detect_machine, precision_reason

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 {extra}\n"


def test_class_follows_the_flags():
    assert cpu_class(cpu_flags(CPUINFO.format(extra="avx512f amx_bf16 amx_tile avx512_bf16")), {}) == ("AMX", None)
    assert cpu_class(cpu_flags(CPUINFO.format(extra="avx512f avx512_bf16")), {}) == ("AVX512-BF16", None)
    assert cpu_class(cpu_flags(CPUINFO.format(extra="fma")), {}) == ("AVX2", None)
    assert cpu_class(cpu_flags("flags : fp asimd\n"), {}) == ("other", None)
    assert cpu_flags("no flags here") == set()


def test_an_isa_cap_lowers_the_class_as_the_kernels_see_it():
    amx = cpu_flags(CPUINFO.format(extra="avx512f amx_bf16 avx512_bf16"))
    assert cpu_class(amx, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ("AVX2", "ONEDNN_MAX_CPU_ISA=AVX2")
    assert cpu_class(amx, {"ATEN_CPU_CAPABILITY": "avx2"}) == ("AVX2", "ATEN_CPU_CAPABILITY=avx2")
    # A cap at or above the CPU's own class changes nothing.
    assert cpu_class(amx, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == ("AMX", None)
    assert cpu_class(cpu_flags(CPUINFO.format(extra="")), {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ("AVX2", None)


def test_detect_machine_and_reason(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    m = detect_machine()
    if m.cpu_class != "CUDA":
        assert not m.bf16 and m.cpu_class in {"AVX2", "other"}
        assert m.describe().startswith(f"{m.cpu_class} (") and m.to_dict()["class"] == m.cpu_class
    avx2 = Machine("AVX2", "x", 2, False)
    assert "no bf16 matmul instructions" in precision_reason(avx2, "auto", "fp32")
    assert precision_reason(Machine("AMX", "x", 2, True), "auto", "bf16") == "AMX has fast bf16 matmuls"
    assert precision_reason(avx2, "bf16", "bf16") == "--precision bf16"
