"""Quantized variants: a registry of formats, memory estimates, loading with an OOM fallback chain,
and saving as safetensors.

bitsandbytes formats (int8 = LLM.int8, nf4, fp4) go through transformers' `BitsAndBytesConfig`, as
users load them; on CPU the 4-bit layers then run as dequantize + float matmul (`microscope.quant4bit`).
`torch-int8` is our weight-only int8 for where bitsandbytes cannot run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import PATCH_FORMAT, QuantizeConfig, unknown_format
from schemas.records import ModelRef

from microscope import pruning
from microscope.errors import InputError, is_oom
from microscope.models import checkpoint, loading
from microscope.native_int8 import Int8Linear, linear_weight, quantize_linears

if TYPE_CHECKING:
    import torch.nn as nn

DEQUANTIZE_MATMUL = "dequantize-matmul"  # also quant4bit.DequantLinear4bit.kernel_path


@dataclass(frozen=True)
class QFormat:
    name: str
    backend: str  # bitsandbytes | torch
    quantized_bytes: Callable[[int], float]  # bytes per quantized weight, given in_features
    other_bytes: float  # bytes per parameter that stays unquantized (relative to fp32 = 4)
    description: str


def _4bit(double_quant: bool) -> Callable[[int], float]:
    # 4 bits per weight + an absmax per 64-weight block: fp32, or 8-bit plus an fp32 per 256 blocks.
    return (lambda _in: 0.5 + 1 / 64 + 4 / (64 * 256)) if double_quant else (lambda _in: 0.5 + 4 / 64)


FORMATS: dict[str, QFormat] = {}


def _register(f: QFormat) -> None:
    if f.name in FORMATS:
        raise ValueError(f"format {f.name!r} registered twice")
    FORMATS[f.name] = f


_register(
    QFormat(
        "int8", "bitsandbytes", lambda n_in: 1 + 4 / n_in, 4, "bitsandbytes LLM.int8 (row-wise int8, fp32 row scales)"
    )
)
_register(QFormat("nf4", "bitsandbytes", _4bit(True), 4, "bitsandbytes 4-bit NormalFloat"))
_register(QFormat("fp4", "bitsandbytes", _4bit(True), 4, "bitsandbytes 4-bit float"))
_register(QFormat("fp16", "torch", lambda _n: 2, 2, "half precision"))
_register(QFormat("bf16", "torch", lambda _n: 2, 2, "bfloat16"))
_register(QFormat("torch-int8", "torch", lambda n_in: 1 + 4 / n_in, 4, "torch-native weight-only int8, per-row scales"))
UNSUPPORTED = {
    "int2": "no maintained 2-bit library (HQQ, AQLM, QuIP#) is installed for this machine's torch; "
    "choose int8, nf4 or fp4",
}


class VariantOOM(RuntimeError):
    """The variant does not fit (estimated before loading, or out-of-memory while loading)."""


def quantizable(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Linear/Conv1D modules a quantizer converts: name -> (out, in). The output embedding stays
    in full precision, as transformers' bitsandbytes integration leaves it."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, mod in model.named_modules():
        wb = linear_weight(mod)
        if wb is not None and mod is not out_emb:
            found[name] = (int(wb[0].shape[0]), int(wb[0].shape[1]))
    return found


def estimate_bytes(model: nn.Module, fmt: str, cfg: QuantizeConfig) -> int:
    """Weight memory of the variant: quantized weights × their bytes + everything else at its dtype."""
    f = format_info(fmt)
    quant = pruning.parse_format(fmt).then if pruning.is_pruning(fmt) else fmt
    per_q = _4bit(cfg.double_quant) if quant in ("nf4", "fp4") else f.quantized_bytes
    q = quantizable(model)
    q_bytes = sum(o * i * per_q(i) for o, i in q.values())
    q_numel = sum(o * i for o, i in q.values())
    other = sum(t.numel() for _, t in loading.unique_state(model) if t.is_floating_point()) - q_numel
    return int(q_bytes + other * f.other_bytes)


def measured_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the variant holds (quantized weights, scales, quantization state)."""
    seen, total = set(), 0
    for t in list(model.state_dict().values()) + [p for p in model.parameters()]:
        if not hasattr(t, "untyped_storage"):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """How many quantized layers run each compute path: 'dequantize-matmul' (4-bit on CPU, torch-int8)
    or 'bnb-<device>-kernel' (bitsandbytes' own dispatch). Empty for float variants."""
    import torch

    paths: Counter[str] = Counter()
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            paths[DEQUANTIZE_MATMUL] += 1
        elif getattr(type(mod), "kernel_path", None):  # quant4bit.DequantLinear4bit
            paths[type(mod).kernel_path] += 1
        elif type(mod).__module__.startswith("bitsandbytes.") and isinstance(mod, torch.nn.Linear):
            paths[f"bnb-{mod.weight.device.type}-kernel"] += 1
    return dict(sorted(paths.items()))


def free_bytes(device: str) -> int:
    import psutil
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    return int(psutil.virtual_memory().available)


def check_format(fmt: str) -> None:
    if why := unknown_format(fmt):
        raise InputError(f"quantize.formats: {why}")
    quant = pruning.parse_format(fmt).then if pruning.is_pruning(fmt) else fmt
    if quant in UNSUPPORTED:
        raise InputError(f"quantize.formats: '{quant}' is unsupported here: {UNSUPPORTED[quant]}")


def format_info(fmt: str) -> QFormat:
    """The registered format, or a pruning format's: stored dense (zeros are not compressed), so its bytes are
    those of the quantization after it, or of full precision; a steering patch's are full precision's."""
    if PATCH_FORMAT.fullmatch(fmt):
        return QFormat(fmt, "patch", lambda _n: 4, 4, "the full-precision model with a steering patch in its weights")
    if not pruning.is_pruning(fmt):
        return FORMATS[fmt]
    spec = pruning.parse_format(fmt)
    scope = {"global": "global", "layer": "per layer" if spec.method == "magnitude" else "per output row"}[spec.scope]
    what = f"{spec.method} pruning to {spec.sparsity:.0%} sparsity ({scope}), {pruning.NOTE}"
    if spec.then is None:
        return QFormat(fmt, "pruning", lambda _n: 4, 4, what)
    then = FORMATS[spec.then]
    return QFormat(fmt, then.backend, then.quantized_bytes, then.other_bytes, f"{what}, then {then.description}")


Calibrate = Callable[[], pruning.Calibration]  # the audit's data for SNIP and Wanda, made only when asked


def load_audited(
    ref: ModelRef, variant: str, cfg: QuantizeConfig, device: str, calibration: Calibrate | None = None
) -> nn.Module:
    """The model a per-variant stage evaluates, in eval mode: full precision ("fp") or the quantized `variant`."""
    from microscope.models import loading

    if variant == "fp":
        return loading.load_model(ref, device).eval()
    return load_variant(ref, variant, cfg, device, calibration)


def load_variant(
    ref: ModelRef, fmt: str, cfg: QuantizeConfig, device: str = "cpu", calibration: Calibrate | None = None
) -> nn.Module:
    """The model quantized (or pruned, then perhaps quantized) to `fmt`, in eval mode. Raises VariantOOM when
    it cannot fit. A pruned model carries what pruning did as `model.microscope_pruning` (sparsity per matrix)."""
    import torch

    check_format(fmt)
    if pruning.is_pruning(fmt):
        return _load_pruned(ref, pruning.parse_format(fmt), cfg, device, calibration)
    if m := PATCH_FORMAT.fullmatch(fmt):
        return _load_patched(ref, m.group(1), cfg, device)
    f = FORMATS[fmt]
    try:
        if f.backend == "bitsandbytes":
            model = _load_bnb(ref, fmt, cfg, device)
        elif fmt in ("fp16", "bf16"):
            model = loading.load_model(ref, device).to({"fp16": torch.float16, "bf16": torch.bfloat16}[fmt])
        else:
            model = loading.load_model(ref, device)
            n = quantize_linears(model, skip=set(loading_skip(model)))
            if n == 0:
                raise _no_linear(model, fmt)
    except Exception as exc:
        if is_oom(exc):
            raise VariantOOM(f"{fmt}: out of memory while loading ({str(exc).splitlines()[0][:120]})") from exc
        raise
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_pruned(
    ref: ModelRef, spec: pruning.PruneSpec, cfg: QuantizeConfig, device: str, calibration: Calibrate | None
) -> nn.Module:
    """Prune the full-precision model (masks folded), then quantize it as `spec.then` says."""
    import torch

    model = loading.load_model(ref, device).eval()
    try:
        report = pruning.prune_with(model, spec, calibration() if calibration and spec.method != "magnitude" else None)
    except ValueError as exc:
        raise InputError(f"quantize.formats: {exc}") from exc
    if spec.then in ("fp16", "bf16"):
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[spec.then])
    elif spec.then == "torch-int8":
        if quantize_linears(model, skip=set(loading_skip(model))) == 0:
            raise _no_linear(model, spec.name)
    elif spec.then is not None:  # bitsandbytes quantizes while loading: load the pruned weights from a folder
        if not hasattr(model, "save_pretrained"):
            raise InputError(
                f"quantize.formats: {spec.name} needs an HF checkpoint for {spec.then}; use +torch-int8 or +fp16"
            )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = _load_bnb(ref, spec.then, cfg, device, path=Path(tmp))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.microscope_pruning = report
    return model


def variant_identity(cfg: QuantizeConfig, variant: str) -> str:
    """What a variant's name stands for in cache keys: the name, and for a steering patch also its files'
    digest, so that a patch folder changed in place is not answered from the cache."""
    import hashlib

    m = PATCH_FORMAT.fullmatch(variant)
    if m is None or m.group(1) not in cfg.patches:
        return variant
    h = hashlib.sha256()
    for name in ("microscope_patch.json", "adapter_model.safetensors"):
        f = Path(cfg.patches[m.group(1)]) / name
        h.update(f.read_bytes() if f.is_file() else b"missing")
    return f"{variant}@{h.hexdigest()[:16]}"


def _load_patched(ref: ModelRef, name: str, cfg: QuantizeConfig, device: str) -> nn.Module:
    """The full-precision model with the steering patch `name` (quantize.patches) written into its weights,
    refused in one line when the patch was made for other weights."""
    from microscope.patches import apply_patch, load_adapter

    if name not in cfg.patches:
        raise InputError(f"quantize.formats: patch-{name} has no folder in quantize.patches; add {name}: <folder>")
    meta, patch = load_adapter(cfg.patches[name])
    model = loading.load_model(ref, device).eval()
    want, got = str(meta.get("weights_digest") or ""), loading.model_digest(model)
    if want != got:
        raise InputError(
            f"quantize.patches.{name} was made for weights {want[:16] or 'unknown'}…, this checkpoint's are "
            f"{got[:16]}…; export the patch from an audit of these weights"
        )
    apply_patch(model, patch)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def loading_skip(model: nn.Module) -> list[str]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if m is out_emb and out_emb is not None]


def _no_linear(model: nn.Module, fmt: str) -> InputError:
    kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
    return InputError(
        f"{type(model).__name__} has no Linear layers to quantize to {fmt} (it holds {', '.join(kinds[:5])}); "
        "use fp16 or bf16 for it"
    )


class _NoCastNotice(logging.Filter):
    """LLM.int8 computes in fp16 by design; bitsandbytes logs that at WARNING on every forward of an fp32
    input (thousands of lines in an attack loop)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _load_bnb(ref: ModelRef, fmt: str, cfg: QuantizeConfig, device: str, path: Path | None = None) -> nn.Module:
    import torch
    import transformers

    loading.quiet_loading_bars(transformers)

    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _NoCastNotice) for f in bnb_log.filters):
        bnb_log.addFilter(_NoCastNotice())

    path = path or checkpoint.local_path(ref.resolved_path, ref.source)
    if not path.is_dir():
        raise InputError(
            f"quantize.formats: {fmt} (bitsandbytes) needs an HF checkpoint folder; for a bare state dict "
            "use torch-int8, fp16 or bf16"
        )
    compute = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.compute_dtype]
    if fmt == "int8":
        qcfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=fmt,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    config = transformers.AutoConfig.from_pretrained(path)
    auto = transformers.AutoModelForCausalLM if loading._is_causal_hf(config) else transformers.AutoModel
    probe = loading.load_model(ref)  # to know whether anything is quantizable before bitsandbytes is asked
    if not quantizable(probe):
        raise _no_linear(probe, fmt)
    del probe
    model = auto.from_pretrained(path, quantization_config=qcfg, device_map=device, dtype=torch.float32)
    if fmt != "int8" and torch.device(device).type == "cpu":
        # Before any forward: bitsandbytes' CPU kernel would repack the weights in place, compute in bf16
        # without gradients and refuse widths that are not multiples of 64 (see microscope.quant4bit).
        from microscope.quant4bit import dequantize_matmul

        dequantize_matmul(model)
    return model


def save_variant(model: nn.Module, fmt: str, out: Path) -> list[Path]:
    """Write the variant as safetensors (save_pretrained for HF models) and return its files."""
    out.mkdir(parents=True, exist_ok=True)
    quant = pruning.parse_format(fmt).then if pruning.is_pruning(fmt) else fmt
    if hasattr(model, "save_pretrained") and quant != "torch-int8":
        model.save_pretrained(out)
    else:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(_dedupe(state), out / "model.safetensors", metadata={"microscope.format": fmt})
        (out / "microscope_variant.json").write_text(json.dumps({"format": fmt, "class": type(model).__name__}))
    return sorted(p for p in out.rglob("*") if p.is_file())


def _dedupe(state: dict[str, Any]) -> dict[str, Any]:
    seen, out = set(), {}
    for k in sorted(state):
        t = state[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[k] = t
    return out


def produce(
    ref: ModelRef,
    fmt: str,
    cfg: QuantizeConfig,
    fp_model: nn.Module,
    device: str = "cpu",
    calibration: Calibrate | None = None,
) -> tuple[nn.Module, str, list[dict[str, str]]]:
    """Load `fmt`, falling back along `cfg.fallback[fmt]` when it does not fit.
    Returns (model, the format produced, the attempts that failed)."""
    attempts: list[dict[str, str]] = []
    for candidate in [fmt, *cfg.fallback.get(fmt, [])]:
        check_format(candidate)
        need = estimate_bytes(fp_model, candidate, cfg)
        free = free_bytes(device)
        if need > cfg.memory_fraction * free:
            attempts.append({"format": candidate, "error": f"needs ~{need:,} bytes, {free:,} free"})
            continue
        try:
            return load_variant(ref, candidate, cfg, device, calibration), candidate, attempts
        except VariantOOM as exc:
            attempts.append({"format": candidate, "error": str(exc)})
    tried = ", ".join(a["format"] for a in attempts)
    raise VariantOOM(f"no variant of {fmt} fits in memory (tried {tried}); free memory or drop the format")
