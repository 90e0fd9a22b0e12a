"""Export a trained adapter merged into its base: a Hugging Face directory or one GGUF file.

    tunesmith export runs/first --format hf --out exports/first-hf
    tunesmith export runs/first --format gguf --dtype q8_0 --out exports/first-gguf

Steps, in order: check every option (all problems reported at once), find the adapter and
its base model (refusing a different base by content hash), load the base in fp32, merge
the LoRA with peft's `merge_and_unload` in fp32, then write into a staging folder beside
`--out` and move it into place, so a failed export leaves nothing half-written. The run
directory is only read.

A QLoRA run's adapter was trained on the NF4-quantized base, so by default (`--merge-base
nf4`) the base is quantized as training did and dequantized again before the merge: the
export computes what was trained and evaluated. `--merge-base original` merges into the
full-precision weights instead (what `tunesmith serve` computes with the adapter on the
unquantized base). Never into the 4-bit weights themselves: see docs/export.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import UsageError
from tunesmith.models.adapters import adapter_meta, check_base, resolve_adapter
from tunesmith.models.gguf_writer import GGUF_DTYPES, check_gguf_exportable, write_gguf
from tunesmith.models.ollama import build_modelfile
from tunesmith.models.quantization import load_nf4_dequantized
from tunesmith.models.registry import identity, load_model, load_tokenizer, resolve_model
from tunesmith.runs import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_META_FILE, ADAPTER_WEIGHTS_FILE, RUN_FILE

FORMATS = ("hf", "gguf")
HF_DTYPES = ("f32", "f16", "bf16")
EXPORT_META = "tunesmith_export.json"
MERGEABLE_PEFT_TYPES = ("LORA",)
MERGE_BASES = ("nf4", "original")
"""For a QLoRA run: merge into dequantize(nf4(W)), the base as trained (default), or into W."""


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str
    adapter: Path
    base_model: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def export_run(
    run: str | Path,
    *,
    format: str,
    out: str | Path,
    dtype: str | None = None,
    checkpoint: str = "best",
    model: str | None = None,
    merge_base: str | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Merge the run's adapter into its base and write it to `out` as `format` ("hf" or "gguf").

    merge_base: for a QLoRA run, "nf4" (default) or "original" (see MERGE_BASES)."""

    run, out = Path(run).expanduser(), Path(out).expanduser()
    dtype = _check_options(run, format, out, dtype, merge_base)
    adapter_dir = resolve_adapter(run, checkpoint)
    adapter_config = _load_adapter_config(adapter_dir)
    quantization = adapter_meta(adapter_dir).get("base_quantization")
    merge_base = _check_merge_base(merge_base, quantization, adapter_dir)
    ref = resolve_model(model or _base_model_name(run, adapter_dir, adapter_config))
    base_identity = identity(ref)
    check_base(adapter_dir, base_identity)

    tokenizer = load_training_tokenizer(adapter_dir, ref)
    if format == "gguf":
        _check_gguf(ref, tokenizer)
    if merge_base == "nf4":
        log(f"merging {adapter_dir} into {ref.name} as trained: quantized to NF4, dequantized to fp32")
    else:
        log(f"merging {adapter_dir} into {ref.name} (fp32)")
    merged = merge_adapter(ref, adapter_dir, quantization if merge_base == "nf4" else None)

    name = run.name if run.name not in (ADAPTER_DIR, "") else adapter_dir.parent.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        stage = Path(tmp) / "out"
        stage.mkdir()
        notes: list[str] = []
        if format == "hf":
            _write_hf(merged, tokenizer, stage, dtype)
        else:
            notes = _write_gguf(merged, tokenizer, stage, dtype, name, log)
        meta = {
            "format": format,
            "dtype": dtype,
            "run": str(run.resolve()),
            "adapter": str(adapter_dir.resolve()),
            "adapter_meta": _read_json(adapter_dir / ADAPTER_META_FILE),
            "base_model": base_identity,
        }
        if merge_base:
            meta["merge_base"] = merge_base
        (stage / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # _check_options allowed only an empty folder
        os.replace(stage, out)
    result = ExportResult(
        out=out, format=format, dtype=dtype, adapter=adapter_dir, base_model=base_identity,
        files=sorted(p for p in out.iterdir() if p.is_file()), warnings=notes,
    )
    for note in notes:
        log(f"warning: {note}")
    return result


def _check_options(run: Path, format: str, out: Path, dtype: str | None, merge_base: str | None = None) -> str:
    """The dtype to use; raises UsageError listing every problem with the options."""

    problems = []
    if format not in FORMATS:
        problems.append(f"--format '{format}' is not one of {', '.join(FORMATS)}")
    if dtype is None:
        dtype = "f16" if format == "gguf" else "f32"
    allowed = GGUF_DTYPES if format == "gguf" else HF_DTYPES
    if format in FORMATS and dtype not in allowed:
        hint = " (q8_0 is a GGUF quantization: use --format gguf for it)" if dtype == "q8_0" else ""
        problems.append(f"--dtype '{dtype}' is not available for --format {format}; use one of {', '.join(allowed)}{hint}")
    if merge_base is not None and merge_base not in MERGE_BASES:
        problems.append(f"--merge-base '{merge_base}' is not one of {', '.join(MERGE_BASES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out '{out}' already exists and is not an empty folder; pick a new path or remove it")
    if run.exists() and _is_within(out, run):
        problems.append(f"--out '{out}' is inside the run directory '{run}'; export never writes into a run, pick a path outside it")
    if problems:
        raise UsageError("cannot export: " + "; ".join(problems))
    return dtype


def _check_merge_base(merge_base: str | None, quantization: dict[str, Any] | None, adapter_dir: Path) -> str | None:
    """"nf4" or "original" for an adapter trained on a quantized base; None for any other."""
    if quantization is None:
        if merge_base is not None:
            raise UsageError(f"cannot export: --merge-base applies to QLoRA runs, and '{adapter_dir}' was not trained "
                             "on a quantized base; leave --merge-base out")
        return None
    return merge_base or "nf4"


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config = _read_json(adapter_dir / ADAPTER_CONFIG_FILE)
    peft_type = config.get("peft_type")
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise UsageError(
            f"adapter '{adapter_dir}' is a {peft_type} adapter; export merges {', '.join(MERGEABLE_PEFT_TYPES)} "
            "adapters only"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS_FILE).is_file():
        raise UsageError(
            f"adapter '{adapter_dir}' has no {ADAPTER_WEIGHTS_FILE}; only safetensors adapters are loaded"
        )
    return config


def _base_model_name(run: Path, adapter_dir: Path, adapter_config: dict[str, Any]) -> str:
    """The base model the run was trained on: run.json, then the adapter's own records."""
    for candidate in (
        _read_json(run / RUN_FILE).get("config", {}).get("model"),
        _read_json(adapter_dir / ADAPTER_META_FILE).get("base_model", {}).get("name"),
        adapter_config.get("base_model_name_or_path"),
    ):
        if candidate:
            return str(candidate)
    raise UsageError(f"cannot tell which base model '{adapter_dir}' was trained on; pass --model NAME_OR_PATH")


def load_training_tokenizer(adapter_dir: Path, ref: Any) -> Any:
    """The tokenizer (and chat template) training used: one saved with the adapter, else the base's."""
    from transformers import AutoTokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(adapter_dir))
    return load_tokenizer(ref)


def merge_adapter(ref: Any, adapter_dir: Path, base_quantization: dict[str, Any] | None = None) -> Any:
    """The base model (fp32) with the adapter's weights folded in: a plain transformers model.

    With `base_quantization` (a QLoRA run's record), the base is first rebuilt as training
    saw it, dequantize(nf4(W)), so the merged model computes what the run trained."""
    from peft import PeftModel

    base = load_nf4_dequantized(ref, base_quantization) if base_quantization else load_model(ref)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    # safe_merge checks the merged weights for NaNs before replacing the originals.
    return peft_model.merge_and_unload(safe_merge=True).eval()


def _check_gguf(ref: Any, tokenizer: Any) -> None:
    from transformers import AutoConfig

    kwargs = {"gguf_file": ref.gguf_file} if ref.is_gguf else {}
    config = AutoConfig.from_pretrained(str(ref.path), **kwargs)
    problems = check_gguf_exportable(config, tokenizer)
    if problems:
        raise UsageError("cannot export as GGUF faithfully: " + "; ".join(problems))


_TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _write_hf(merged: Any, tokenizer: Any, stage: Path, dtype: str) -> None:
    import torch

    merged = merged.to(getattr(torch, _TORCH_DTYPES[dtype]))
    merged.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)


def _write_gguf(merged: Any, tokenizer: Any, stage: Path, dtype: str, name: str, log: Callable[[str], None]) -> list[str]:
    gguf_name = f"{name}-{dtype}.gguf"
    log(f"writing {gguf_name} ({dtype})")
    write_gguf(merged, tokenizer, stage / gguf_name, dtype, name=name, log=log)
    modelfile, warning = build_modelfile(gguf_name, tokenizer)
    (stage / "Modelfile").write_text(modelfile)
    return [warning] if warning else []


def describe(result: ExportResult) -> str:
    """One line for the user: where the export is and how big."""
    files = ", ".join(f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in result.files if f.stat().st_size > 1e5)
    return (
        f"exported {result.format} ({result.dtype}) to {result.out}: {result.size_bytes / 1e6:.1f} MB in "
        f"{len(result.files)} files; {files}"
    )
