"""Build a model (and its tokenizer) from a ModelRef, and describe and digest it."""

from __future__ import annotations

import hashlib
import importlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import ModelConfig
from schemas.records import Architecture, HookPoints, ModelParams, ModelRef

from microscope.errors import InputError
from microscope.models import checkpoint
from microscope.models.families import Family, child_path, family_for, find_blocks

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def resolve(cfg: ModelConfig) -> ModelRef:
    """Locate the checkpoint and fingerprint its files (cheap: no model is built)."""
    if not cfg.source:
        raise InputError("no model given; pass --model PATH or set model.source in the config")
    path = checkpoint.locate(cfg.source, cfg.revision)
    if path.is_file() and not cfg.module:
        raise InputError(
            f"{path.name} is a bare state dict; set model.module to its class ('package.module:Class') "
            "and model.kwargs to its arguments"
        )
    if path.is_file() and path.suffix not in checkpoint.WEIGHT_SUFFIXES:
        raise InputError(f"{path} is not a checkpoint; use an HF folder, .safetensors, .pt, .pth or .bin")
    checkpoint.preflight(path)
    extra = {"module": cfg.module, "kwargs": cfg.kwargs, "dtype": cfg.dtype}
    return ModelRef(
        source=cfg.source,
        resolved_path=str(path),
        module=cfg.module,
        kwargs=cfg.kwargs,
        tokenizer=cfg.tokenizer,
        revision=cfg.revision,
        dtype=cfg.dtype,
        allow_partial_weights=cfg.allow_partial_weights,
        allow_nonfinite=cfg.allow_nonfinite,
        source_fingerprint=checkpoint.fingerprint(path, extra),
    )


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _import_class(path: str) -> type:
    mod_name, _, cls_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"model.module '{path}' cannot be imported ({exc}); check the module path") from None
    if not isinstance(cls, type):
        raise InputError(f"model.module '{path}' is not a class")
    return cls


def _is_causal_hf(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


# transformers builds models under process-global patches (meta-device init, default dtype): two threads
# loading at once (concurrent task runs) corrupt each other's models, so loads take turns.
_LOAD_LOCK = threading.Lock()


def load_model(ref: ModelRef, device: str = "cpu") -> nn.Module:
    """The model in eval mode, in `ref.dtype`, on `device` (stages that run it ask for the settings'
    compute device; digests and weight statistics read it on the CPU)."""
    with _LOAD_LOCK:
        model = _load_model(ref)
    return model if device == "cpu" else model.to(device)


def compute_device() -> str:
    """Where stages run models: the settings' device (`auto`: CUDA when a GPU is visible)."""
    from microscope.settings import get_settings

    return get_settings().torch_device()


def quiet_loading_bars(transformers: Any) -> None:
    """transformers draws a "Loading weights" bar per model load: fine on a terminal, a wall of
    carriage returns in a log file or CI."""
    import sys

    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()


def _load_model(ref: ModelRef) -> nn.Module:
    path = checkpoint.local_path(ref.resolved_path, ref.source)
    dtype = _torch_dtype(ref.dtype)
    if path.is_dir():
        checkpoint.check_hf_folder(path)
        import transformers

        quiet_loading_bars(transformers)
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            auto = transformers.AutoModelForCausalLM if _is_causal_hf(config) else transformers.AutoModel
            model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: config/weight shapes differ
            if "ignore_mismatched_sizes" in str(exc):  # its "report" went to a log: say what it said
                raise InputError(_shape_mismatch(auto, path, dtype)) from None
            raise InputError(f"transformers cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
        _check_coverage(path, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), ref)
    else:
        model = _load_bare(path, ref, dtype)
    if next(model.parameters(), None) is None:
        raise InputError(
            f"{path.name} builds a model with no parameters; there is nothing to audit (check model.module)"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype) if ref.dtype != "float32" else model


def _shape_mismatch(auto: Any, path: Path, dtype: torch.dtype) -> str:
    """Which tensors differ in shape between config.json and the weights (transformers only logs it)."""
    _, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    bad = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    shown = "; ".join(f"{k}: weights {list(a)}, config.json {list(b)}" for k, a, b in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return (
        f"{path.name}: config.json does not fit the saved weights: {shown}{more}; fix config.json or re-save the model"
    )


def _load_bare(path: Path, ref: ModelRef, dtype: torch.dtype) -> nn.Module:
    import torch

    state = checkpoint.read_state_dict(path)  # before importing the class: a bad file fails first
    cls = _import_class(ref.module or "")
    try:
        config_class = getattr(cls, "config_class", None)
        if config_class is not None and hasattr(cls, "from_pretrained"):
            model = cls(config_class(**ref.kwargs))
        else:
            model = cls(**ref.kwargs)
    except TypeError as exc:
        raise InputError(f"model.kwargs do not fit {ref.module}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model.module '{ref.module}' builds a {type(model).__name__}, not a torch.nn.Module")
    result = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    _check_coverage(path, missing, list(result.unexpected_keys), ref, "check model.module and model.kwargs")
    return model


def _check_coverage(path: Path, missing: list[str], unexpected: list[str], ref: ModelRef, fix: str = "") -> None:
    """Weights that do not cover the model (a config asking for more layers than were saved, an empty weights
    file) would be audited as random initialisation: refused, naming the keys, unless allowed."""
    if not (missing or unexpected) or ref.allow_partial_weights:
        return
    parts = [f"{len(missing)} missing ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"] if missing else []
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''})"
        )
    fix = fix or "check that config.json matches the saved weights"
    raise InputError(
        f"{path.name} does not fit its model: {'; '.join(parts)} keys; {fix}, or set "
        "model.allow_partial_weights: true to audit it anyway"
    )


def load_tokenizer(ref: ModelRef) -> Any:
    import transformers

    path = checkpoint.local_path(ref.resolved_path, ref.source)
    where = ref.tokenizer or (str(path) if path.is_dir() else None)
    if where is None:
        raise InputError("a bare state dict has no tokenizer; set model.tokenizer to a tokenizer folder or hub id")
    try:
        return transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"no tokenizer could be loaded from {where} ({str(exc).splitlines()[0]}); set model.tokenizer"
        ) from None


def unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State dict entries in sorted-name order with tied tensors kept once (under the first name)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = []
    for name, t in sorted(model.state_dict().items()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def model_digest(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every unique tensor: the same weights give the same
    digest whatever file format they came from."""
    import torch

    h = hashlib.sha256()
    for name, t in unique_state(model):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bf16 included)
    return h.hexdigest()


# config fields that say where a model came from, not what it computes
CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}
)
# the files a tokenizer is made of (in the tokenizer's folder, whichever of them it has)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def nonfinite(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per tensor holding any: its count of NaN and of ±Inf values."""
    import torch

    out = {}
    for name, t in unique_state(model):
        if not t.is_floating_point():
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            out[name] = {"nan": nan, "inf": inf}
    return out


def check_finite(model: nn.Module, ref: ModelRef) -> dict[str, dict[str, int]]:
    """NaN/Inf weights make every later figure meaningless (a trace of zeros, spectra that do not converge):
    refused, naming the tensors, unless model.allow_nonfinite; returns the counts (empty when finite)."""
    bad = nonfinite(model)
    if bad and not ref.allow_nonfinite:
        raise InputError(
            f"{describe_nonfinite(bad)}; fix the checkpoint or set model.allow_nonfinite: true to audit it anyway"
        )
    return bad


def describe_nonfinite(bad: dict[str, dict[str, int]]) -> str:
    """'2 weight tensor(s) hold non-finite values: a (3 NaN, 0 Inf), b (…)': the refusal, and the warning the
    record, the command line and the report carry when the audit was asked for anyway."""
    named = ", ".join(f"{k} ({v['nan']} NaN, {v['inf']} Inf)" for k, v in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} weight tensor(s) hold non-finite values: {named}{more}"


def function_digest(model: nn.Module, ref: ModelRef, weights: str | None = None) -> str:
    """What decides the model's outputs, hashed: its weights (`model_digest`), its class and config (an
    activation, a norm's eps, RoPE θ), the module and kwargs of a bare state dict, and its tokenizer's
    files. The audit's cache keys are built on it, so a checkpoint with the same weights but another
    config or tokenizer is never served another model's activations or token ids."""
    import json

    h = hashlib.sha256((weights or model_digest(model)).encode())  # `weights`: the caller hashed them already
    h.update(f"|{type(model).__module__}.{type(model).__qualname__}|{ref.module}|".encode())
    h.update(json.dumps(ref.kwargs, sort_keys=True, default=str).encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in CONFIG_BOOKKEEPING}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update(tokenizer_digest(ref).encode())
    return h.hexdigest()


def tokenizer_digest(ref: ModelRef) -> str:
    """sha256 over the tokenizer's files (model.tokenizer, else the checkpoint's folder); a hub id by name."""
    where = ref.tokenizer or ref.resolved_path
    h = hashlib.sha256()
    folder = Path(where) if where else None
    if folder is not None and folder.is_file():
        folder = folder.parent
    if folder is not None and folder.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                h.update(f"{name}\n".encode())
                h.update((folder / name).read_bytes())
    elif where:
        h.update(f"hub:{where}".encode())
    return h.hexdigest()


def hook_points(model: nn.Module, family: Family | None = None) -> tuple[str, list[HookPoints]]:
    family = family or family_for(model)
    try:
        blocks_name, blocks = find_blocks(model, family)
    except ValueError:  # no stack of blocks (a small CNN): described and audited, but nothing to trace
        return "", []
    points = []
    for i, block in enumerate(blocks):
        base = f"{blocks_name}.{i}"
        attn, mlp = child_path(block, family, "attn"), child_path(block, family, "mlp")
        points.append(
            HookPoints(
                layer=i,
                resid=base,
                attn=f"{base}.{attn}" if attn else None,
                mlp=f"{base}.{mlp}" if mlp else None,
            )
        )
    return blocks_name, points


def describe(model: nn.Module) -> Architecture:
    family = family_for(model)
    blocks_name, points = hook_points(model, family)
    cfg = getattr(model, "config", None)

    def cfg_get(*names: str) -> int | None:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int):
                return v
        return None

    n_params = sum(t.numel() for _, t in unique_state(model) if t.is_floating_point())
    modules = module_table(model, blocks_name)
    has_unembed = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    first = next(iter(model.parameters()), None)
    return Architecture(
        family=family.name,
        model_type=getattr(cfg, "model_type", None),
        class_name=type(model).__name__,
        n_layers=len(points),
        hidden_size=cfg_get("hidden_size", "n_embd", "d_model"),
        n_heads=cfg_get("num_attention_heads", "n_head"),
        vocab_size=cfg_get("vocab_size"),
        n_params=n_params,
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else "none",
        has_unembedding=bool(has_unembed),
        is_causal=family.causal or (cfg is not None and _is_causal_hf(cfg)),
        modules=modules,
        hook_points=points,
    )


def module_table(model: nn.Module, blocks_name: str) -> list[ModelParams]:
    """Parameters per module: the modules beside the blocks (embeddings, final norm, head), each
    block, and each block's direct children (attention, MLP, norms)."""
    parts = blocks_name.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}  # "", "bert", "bert.encoder"
    rows = []
    for name, mod in model.named_modules():
        parent, _, _ = name.rpartition(".")
        in_blocks = name.startswith(blocks_name + ".")
        depth = name[len(blocks_name) + 1 :].count(".") if in_blocks else -1
        beside = not in_blocks and parent in ancestors and name not in ancestors and name != blocks_name
        if beside or 0 <= depth <= 1:
            n = sum(p.numel() for p in mod.parameters())
            if n:
                rows.append(ModelParams(name=name, type=type(mod).__name__, params=n))
    return rows
