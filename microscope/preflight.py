"""What an audit will need, estimated before anything is loaded: parameters and dtypes from the safetensors
headers (8-byte length + JSON, never the data), weight memory per format with the bytes-per-weight rules of
`microscope.quantization`, the activation cache's size on disk, and the free disk and memory to hold them.

Nothing here unpickles, builds a model or reaches the network: a pickle-only checkpoint or a hub id that is not
in the local cache says so in one line instead.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import PATCH_FORMAT, AuditConfig

from microscope import pruning
from microscope.errors import InputError
from microscope.models import checkpoint

# bytes per element of each safetensors dtype (the format's own table, as checkpoint.py reads it)
ST_BYTES = checkpoint._ST_DTYPES
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3")
MODEL_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Most faithful first: the recommendation is the first of these whose weights fit (fp32 is the model as audited).
FAITHFUL = ("fp32", "fp16", "bf16", "int8", "torch-int8", "nf4", "fp4")
# Embedding tables are nn.Embedding (never quantized) and the output embedding stays full precision, as
# `quantization.quantizable` leaves them; every other 2-D float `.weight` counts as a Linear's.
_EMBEDDING = re.compile(r"(^|\.)(wte|wpe|lm_head|shared)\.weight$|emb|predictions\.decoder")
# HF families whose Linear layers are transformers' Conv1D, which stores its weight as [in, out]
_CONV1D_FAMILIES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
ROW_INDEX_BYTES = 16  # window, position, doc_id, token_id: int32 each (schemas/activations.py)
FP = "fp"  # the full-precision model as the audit loads it (model.dtype), as records name it
HEADER_MAX = 100_000_000  # as checkpoint.check_safetensors: a longer header is a corrupt file


@dataclass(frozen=True)
class Figure:
    """One estimated number (None: not known before loading) and the line that says where it comes from."""

    value: int | None
    why: str


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Preflight:
    model: str
    parameters: Figure
    dtypes: dict[str, int]  # safetensors dtype -> parameters stored in it
    weights: dict[str, Figure]  # FP (the model as audited, in model.dtype) and each requested format -> bytes
    trace: Figure
    free_disk: Figure
    free_memory: Figure
    recommended: str | None = None
    recommendation: str = ""
    warnings: list[str] = field(default_factory=list)

    def fits(self, fmt: str, fraction: float) -> bool | None:
        need, free = self.weights[fmt].value, self.free_memory.value
        return None if need is None or free is None else need <= fraction * free


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: its first 8 bytes give the header's length; nothing else is read."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(HEADER_MAX, path.stat().st_size - 8):
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        return header
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a valid safetensors file ({exc}); re-save or re-download it") from None


def _tensors(files: list[Path]) -> list[Tensor]:
    out = []
    for f in files:
        for name, entry in read_header(f).items():
            if name == "__metadata__":
                continue
            if (
                not isinstance(entry, dict)
                or entry.get("dtype") not in ST_BYTES
                or not isinstance(entry.get("shape"), list)
            ):
                raise InputError(f"{f}: tensor {name!r} has no known dtype or shape; re-save the checkpoint")
            out.append(Tensor(name, entry["dtype"], tuple(int(d) for d in entry["shape"])))
    return out


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, a folder's, or a sharded index's), else one line why not."""
    if not path.exists():
        raise InputError(f"model: {path} does not exist; pass an HF folder, a .safetensors file or a hub id")
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path]
        if path.suffix in checkpoint.WEIGHT_SUFFIXES:
            raise _pickle_only(path)
        raise InputError(f"model: {path} is not a checkpoint; use an HF folder or a .safetensors, .pt or .bin file")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"model: {index} has no weight_map; re-save the checkpoint with save_pretrained") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise InputError(f"model: {index} names shard {missing[0]}, which is not in {path}; download every shard")
        return [path / s for s in shards]
    files = sorted(f for f in path.glob("*.safetensors") if not checkpoint.is_trainer_state(f.name))
    if files:
        return files
    pickles = [
        f for f in path.iterdir() if f.suffix in checkpoint.WEIGHT_SUFFIXES and not checkpoint.is_trainer_state(f.name)
    ]
    if pickles:
        raise _pickle_only(pickles[0])
    raise InputError(f"model: {path} holds no weight files (*.safetensors); save the model with save_pretrained")


def _pickle_only(f: Path) -> InputError:
    return InputError(
        f"model: {f.name} is a pickled checkpoint; it cannot be estimated without loading it (it is never unpickled "
        "here): re-save it as safetensors, or start the audit and ingest will read it safely"
    )


def _hub_cache(repo_id: str) -> Path | None:
    """The local snapshot of a hub id, if the HF cache holds its config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 -- a malformed id or no cache: it is simply not here
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except ValueError:
        return {}


def _first(cfg: dict[str, Any], *keys: str) -> int | None:
    return next((int(cfg[k]) for k in keys if isinstance(cfg.get(k), int)), None)


def quantizable(tensors: list[Tensor], conv1d: bool) -> list[tuple[int, int]]:
    """(out, in) of each weight a quantizer converts, as `quantization.quantizable` finds them on the model:
    2-D float `.weight`s that are not embeddings (Conv1D stores [in, out])."""
    out = []
    for t in tensors:
        if (
            len(t.shape) == 2
            and t.dtype in FLOAT_DTYPES
            and t.name.endswith(".weight")
            and not _EMBEDDING.search(t.name)
        ):
            o, i = (t.shape[1], t.shape[0]) if conv1d else t.shape
            out.append((o, i))
    return out


def format_bytes(fmt: str, tensors: list[Tensor], conv1d: bool, cfg: AuditConfig) -> int:
    """`quantization.estimate_bytes` computed from the header: quantized weights × their bytes per weight +
    every other float parameter × the format's bytes for what stays unquantized."""
    from microscope.quantization import _4bit, format_info

    f = format_info(fmt)
    quant = pruning.parse_format(fmt).then if pruning.is_pruning(fmt) else fmt
    per_q = _4bit(cfg.quantize.double_quant) if quant in ("nf4", "fp4") else f.quantized_bytes
    q = quantizable(tensors, conv1d)
    q_bytes = sum(o * i * per_q(i) for o, i in q)
    other = sum(t.numel for t in tensors if t.dtype in FLOAT_DTYPES) - sum(o * i for o, i in q)
    return int(q_bytes + other * f.other_bytes)


def trace_bytes(tokens: int, hidden: int, hooks: int, layers: int, variants: int) -> int:
    """The activation cache: per traced token one float32 vector of `hidden` plus four int32 index columns, per
    (layer, hook), for the full-precision model and each traced variant (no compression: trace.compression none)."""
    return tokens * (4 * hidden + ROW_INDEX_BYTES) * hooks * layers * variants


def _free_disk(store_uri: str | None) -> Figure:
    if store_uri is None:
        return Figure(None, "no store given: free disk not measured")
    if "://" in store_uri.removeprefix("file://"):
        return Figure(None, f"the store {store_uri} is remote: its free space is not measured here")
    p = Path(store_uri.removeprefix("file://")).expanduser().absolute()
    while not p.exists():  # the store is made by the first audit: measure the disk it will be on
        p = p.parent
    return Figure(shutil.disk_usage(p).free, f"free on the disk of the store {store_uri} (shutil.disk_usage of {p})")


def _free_memory() -> Figure:
    import psutil

    return Figure(
        int(psutil.virtual_memory().available),
        "host memory available now (psutil); a GPU's memory is checked when a variant is loaded",
    )


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def estimate(model: str, cfg: AuditConfig, store_uri: str | None = None) -> Preflight:
    """The pre-flight of auditing `model` with `cfg` into the store at `store_uri` (the entry point's settings
    say which; without one the free disk is not measured)."""
    model = model.strip()
    if not model:
        raise InputError("model: no model given; pass an HF folder, a .safetensors file or a hub id")
    disk, memory = _free_disk(store_uri), _free_memory()
    path: Path | None = None
    if model.startswith("s3://"):
        why = "s3:// checkpoints are estimated when the audit fetches them (local only)"
    else:
        p = Path(model).expanduser()
        if p.exists() or checkpoint.looks_like_path(model):
            path = p
        else:
            path = _hub_cache(model)
        why = f"hub id {model} is not in the local cache: unknown until downloaded"
    if path is None:
        unknown = Figure(None, why)
        weights = {f: unknown for f in (FP, *cfg.quantize.formats)}
        return Preflight(model, unknown, {}, weights, unknown, disk, memory, warnings=[why])

    files = weight_files(path)
    tensors = _tensors(files)
    hf = _config(path)
    conv1d = hf.get("model_type") in _CONV1D_FAMILIES
    n = sum(t.numel for t in tensors)
    dtypes: dict[str, int] = {}
    for t in tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    stored = ", ".join(f"{k} {v:,}" for k, v in sorted(dtypes.items()))
    params = Figure(
        n, f"sum of tensor shapes in {len(files)} safetensors header(s) ({stored}); tied weights count once"
    )

    as_loaded = n * MODEL_DTYPE_BYTES[cfg.model.dtype]
    weights = {
        FP: Figure(as_loaded, f"{n:,} parameters × {MODEL_DTYPE_BYTES[cfg.model.dtype]} bytes ({cfg.model.dtype})")
    }
    for fmt in cfg.quantize.formats:
        if PATCH_FORMAT.fullmatch(fmt):
            weights[fmt] = Figure(as_loaded, "a steering patch: the full-precision model's weights")
            continue
        why_q = "quantized Linear weights at the format's bytes per weight, the rest at its unquantized bytes"
        weights[fmt] = Figure(format_bytes(fmt, tensors, conv1d, cfg), f"{fmt}: {why_q} (quantization.estimate_bytes)")

    trace = _trace(hf, cfg)
    out = Preflight(model, params, dtypes, weights, trace, disk, memory)
    _judge(out, tensors, conv1d, cfg)
    return out


def _trace(hf: dict[str, Any], cfg: AuditConfig) -> Figure:
    hidden = _first(hf, "hidden_size", "n_embd", "d_model")
    n_layers = _first(hf, "num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or n_layers is None:
        return Figure(None, "no config.json with the hidden size and layer count: known after ingest")
    from microscope.trace import resolve_layers

    layers = len(resolve_layers(cfg.trace.layers, n_layers))
    hooks = len(cfg.trace.hooks)
    # packed windows of seq_len, stopped at max_tokens: the most tokens a dataset can give
    tokens = cfg.dataset.max_tokens // cfg.dataset.seq_len * cfg.dataset.seq_len
    variants = 1 + (len(cfg.quantize.formats) if cfg.quantize.trace_variants else 0)
    size = trace_bytes(tokens, hidden, hooks, layers, variants)
    return Figure(
        size,
        f"at most {tokens:,} tokens × ({hidden} float32 + 16 bytes of indices) × {hooks} hook(s) × {layers} layer(s) "
        f"× {variants} model(s) (full precision + traced variants), uncompressed Parquet",
    )


def _judge(out: Preflight, tensors: list[Tensor], conv1d: bool, cfg: AuditConfig) -> None:
    """Warnings where something does not fit, and the most faithful format that does."""
    frac = cfg.quantize.memory_fraction
    free = out.free_memory.value
    fp = out.weights[FP].value or 0
    if free is not None:
        if fp > frac * free:
            out.warnings.append(
                f"the model as audited needs {_gib(fp)}, more than {frac:.0%} of the {_gib(free)} free: it does not fit"
            )
        for fmt, fig in out.weights.items():
            if fmt != FP and fig.value is not None and fp + fig.value > frac * free:
                out.warnings.append(
                    f"{fmt}: {_gib(fig.value)} beside the full-precision {_gib(fp)} exceeds {frac:.0%} of the "
                    f"{_gib(free)} free; quantize falls back along quantize.fallback or skips it"
                )
        if fp > frac * free:
            for fmt in FAITHFUL:
                need = sum(t.numel for t in tensors) * 4 if fmt == "fp32" else format_bytes(fmt, tensors, conv1d, cfg)
                if need <= frac * free:
                    out.recommended = fmt
                    out.recommendation = (
                        f"{fmt} ({_gib(need)}) is the most faithful format that fits in {frac:.0%} of {_gib(free)}: "
                        f"set model.dtype to {'float16' if fmt == 'fp16' else 'bfloat16'}"
                        if fmt in ("fp16", "bf16")
                        else f"{fmt} ({_gib(need)}) is the most faithful format that fits in {frac:.0%} of {_gib(free)}"
                    )
                    break
            else:
                out.recommendation = "no format fits in memory: free memory or audit on a larger machine"
        else:
            out.recommendation = f"the full-precision model fits ({_gib(fp)} of {_gib(free)} free)"
    disk, trace = out.free_disk.value, out.trace.value
    if disk is not None and trace is not None and trace > disk:
        out.warnings.append(
            f"the activation cache needs {_gib(trace)} but the store's disk has {_gib(disk)} free: "
            "trace fewer layers or hooks, lower dataset.max_tokens, or point the store at a larger disk"
        )
