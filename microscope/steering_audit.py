"""The feature lab's model and SAE, taken from a finished audit: the checkpoint (full precision or one of its
variants) as the audit saw it, the SAE the audit trained on `hook`, the hook's module and each feature's
max activation (the unit steering's α is measured in), and the tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import AuditConfig
from schemas.records import AuditRecord, StageStatus

from microscope import audits
from microscope.errors import InputError
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import numpy as np

    from microscope.steering import Steerer


@dataclass
class Lab:
    record: AuditRecord
    hook: str
    variant: str
    module_path: str
    steerer: Steerer
    tokenizer: Any
    max_acts: np.ndarray
    pool: Any = None  # (windows, their pooled embeddings): nearest_texts' table, made once per lab


def sae_folder(store: ArtifactStore, record: AuditRecord, hook: str) -> Path:
    """A local folder holding the SAE's cfg.json and sae_weights.safetensors."""
    sae = record.saes.get(hook)
    if sae is None or sae.status in (StageStatus.failed, StageStatus.skipped):
        trained = ", ".join(
            h for h, r in record.saes.items() if r.status not in (StageStatus.failed, StageStatus.skipped)
        )
        raise InputError(f"audit {record.audit_id} has no SAE on {hook!r}; trained: {trained or 'none'}")
    paths = [store.local_path(f"{sae.details['prefix']}/sae/{f}") for f in ("cfg.json", "sae_weights.safetensors")]
    if paths[0].parent == paths[1].parent:
        return paths[0].parent
    folder = Path(tempfile.mkdtemp(prefix="microscope-sae-"))  # a remote store's cache may split them
    for p in paths:
        shutil.copy(p, folder / p.name)
    return folder


def module_of(record: AuditRecord, hook: str) -> str:
    """The module whose output the hook reads (as the trace stage recorded it)."""
    trace = record.stages.get("trace")
    datasets = (trace.details.get("datasets") or {}) if trace is not None else {}
    if hook not in datasets:
        raise InputError(f"audit {record.audit_id} did not trace {hook!r}; traced: {', '.join(datasets) or 'nothing'}")
    return str(datasets[hook]["module"])


def open_lab(store: ArtifactStore, audit_id: str, hook: str, variant: str = "fp", device: str | None = None) -> Lab:
    import numpy as np

    from microscope import results
    from microscope.modality import open_data
    from microscope.models import loading
    from microscope.quantization import load_audited
    from microscope.sae.io import load
    from microscope.steering import Steerer

    record = audits.load(store, audit_id)
    if variant != "fp" and variant not in record.variants:
        raise InputError(f"audit {audit_id} has no variant {variant!r}; it has: fp, {', '.join(record.variants)}")
    folder = sae_folder(store, record, hook)
    module_path = module_of(record, record.saes[hook].details.get("hook", hook))  # `H@import` reads H
    table = results.features(store, record, hook)
    sae = load(folder)
    max_acts = np.full(int(sae.cfg["d_sae"]), np.nan)
    max_acts[table["feature"].to_numpy(dtype=np.int64)] = table["max_activation"].to_numpy(dtype=np.float64)
    cfg = AuditConfig.model_validate(record.config)
    arch = record.architecture
    if arch is None:
        raise InputError(f"audit {audit_id} has no architecture (ingest did not finish); run the audit again")

    def calibration() -> Any:  # SNIP and Wanda variants are pruned on the audit's own data, as the stages did
        return open_data(record.stages["ingest"], store).pruning_calibration(arch, cfg)

    model = load_audited(record.model, variant, cfg.quantize, device or loading.compute_device(), calibration)
    tokenizer = loading.load_tokenizer(record.model)
    causal = arch.is_causal and arch.has_unembedding
    steerer = Steerer(model, sae.to(next(model.parameters()).device), module_path, max_acts, causal)
    return Lab(record, hook, variant, module_path, steerer, tokenizer, max_acts)


def pooled(model: Any, windows: Any, batch: int = 32) -> Any:
    """Mean-pooled last hidden states of an encoder, one row per window (float64, on the CPU)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = windows[i : i + batch].to(next(model.parameters()).device)
            out.append(model(input_ids=ids).last_hidden_state.double().mean(1).cpu())
    return torch.cat(out)


def nearest_windows(table: Any, query: Any, k: int = 3) -> list[tuple[int, float]]:
    """The k rows of `table` [N, d] nearest `query` [d] by cosine: (row, cosine), nearest first."""
    import torch

    cos = torch.nn.functional.cosine_similarity(table, query.double().cpu()[None, :], dim=1)
    top = cos.topk(min(k, len(cos)))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices, strict=True)]


NEAREST_POOL = 256  # the audit's first windows the nearest texts are looked up among


def nearest_texts(lab: Lab, store: ArtifactStore, ids: Any, edits: list[Any], where: Any) -> dict[str, Any]:
    """An encoder's clean and edited prompt embeddings: the audit's texts nearest each (the first
    NEAREST_POOL windows, mean-pooled), as {nearest_clean, nearest_edited}: [{window, cosine, text}]."""
    import torch

    from microscope.modality import open_data

    if lab.pool is None:  # once per lab: a change of α then costs two passes over the prompt only
        windows = torch.from_numpy(open_data(lab.record.stages["ingest"], store).ids[:NEAREST_POOL].astype("int64"))
        lab.pool = (windows, pooled(lab.steerer.model, windows))
    windows, table = lab.pool
    with torch.no_grad():
        clean = lab.steerer.forward(ids).last_hidden_state[0].double().mean(0)
        edited = lab.steerer.forward(ids, edits, where).last_hidden_state[0].double().mean(0)

    def texts(query: Any) -> list[dict[str, Any]]:
        return [
            {"window": i, "cosine": c, "text": lab.tokenizer.decode(windows[i][:24], skip_special_tokens=True)}
            for i, c in nearest_windows(table, query)
        ]

    return {"nearest_clean": texts(clean), "nearest_edited": texts(edited)}
