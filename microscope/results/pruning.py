"""Pruned variants: sparsity against fidelity (a curve when several levels of one method were asked) and
where in a matrix the zeros fell (the mask view, pooled to a grid)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from schemas.config import PRUNE_FORMAT
from schemas.records import AuditRecord, StageStatus

from microscope.errors import InputError
from microscope.results.missing import number
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

# The fidelity figure a curve plots, in order of preference (text models first; classifiers' accuracy).
CURVE_FIGURES = ("kl_mean", "top1_agreement", "delta_ppl", "accuracy_q")


def pruning_table(record: AuditRecord) -> pd.DataFrame:
    """One row per pruned variant that finished: `variant`, `method` (magnitude, magnitude-layer, snip, wanda;
    `+quant` kept), `target` and `sparsity` (fractions: asked for, and the exact share of zeros in the pruned
    matrices), and the fidelity figures of CURVE_FIGURES it has (NaN where undefined); sorted by method and
    sparsity, so each method's rows are its sparsity-vs-fidelity curve. Empty without pruned variants."""
    import pandas as pd

    rows = []
    for v, recs in sorted(record.variants.items()):
        q, m = recs.get("quantize"), PRUNE_FORMAT.fullmatch(v)
        if q is None or m is None or q.status in (StageStatus.failed, StageStatus.skipped):
            continue
        p = q.details.get("pruning") or {}
        method = m.group(1) + (m.group(2) or "") + (f"+{m.group(4)}" if m.group(4) else "")
        row: dict[str, Any] = {"variant": v, "method": method, "target": p.get("target"), "sparsity": p.get("overall")}
        row |= {f: number(q.metrics.get(f)) for f in CURVE_FIGURES if f in q.metrics or f in q.undefined}
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["variant", "method", "target", "sparsity"])
    return df.sort_values(["method", "sparsity"], kind="stable").reset_index(drop=True) if rows else df


def pruned_matrices(record: AuditRecord, variant: str) -> dict[str, float]:
    """The pruned variant's matrices (module name -> exact sparsity), largest first."""
    q = record.variants.get(variant, {}).get("quantize")
    if q is None or not (q.details.get("pruning") or {}).get("matrices"):
        raise InputError(f"{variant!r} is not a pruned variant of audit {record.audit_id}")
    mats = q.details["pruning"]["matrices"]
    return dict(sorted(mats.items(), key=lambda kv: (-kv[1], kv[0])))


def mask_grid(store: ArtifactStore, record: AuditRecord, variant: str, matrix: str, cells: int = 48) -> np.ndarray:
    """The kept share (0: all pruned, 1: all kept) of `matrix`'s weight pooled to at most cells × cells blocks
    ([out, in] as the module computes; a convolution's kernels flattened into `in`), read from the variant as
    the quantize stage saved it. A variant quantized after pruning stores packed weights: refused, naming it."""
    from safetensors import safe_open

    pruned_matrices(record, variant)  # refuses a variant that is not pruned
    q = record.variants[variant]["quantize"]
    if q.details["pruning"].get("matrices", {}).get(matrix) is None:
        raise InputError(f"{matrix!r} was not pruned in {variant}; pick one of its pruned matrices")
    if "+" in variant and not variant.endswith(("+fp16", "+bf16")):
        raise InputError(f"{variant} stores its weights quantized: view the masks of the variant without +quant")
    key = f"{q.details['prefix']}/variant/model.safetensors"
    if not store.exists(key):
        raise InputError(f"{variant}: the saved variant ({key}) is not in the store; run the audit again")
    with safe_open(str(store.local_path(key)), framework="np") as f:
        names = set(f.keys())
        name = next((n for n in (f"{matrix}.weight", matrix) if n in names), None)
        if name is None:
            raise InputError(f"{matrix}.weight is not in {variant}'s saved weights")
        w = f.get_tensor(name)
    w = w.T if _is_conv1d(names, matrix, w) else w.reshape(w.shape[0], -1)
    kept = (w != 0).astype(np.float64)
    return _pool(kept, cells)


def _is_conv1d(names: set[str], matrix: str, w: np.ndarray) -> bool:
    """GPT-2's Conv1D stores [in, out]: its module names are c_attn, c_proj, c_fc."""
    return w.ndim == 2 and matrix.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")


def _pool(a: np.ndarray, cells: int) -> np.ndarray:
    """Mean over near-equal blocks so the result is at most cells × cells."""
    rows = np.array_split(np.arange(a.shape[0]), min(cells, a.shape[0]))
    cols = np.array_split(np.arange(a.shape[1]), min(cells, a.shape[1]))
    return np.array([[a[np.ix_(r, c)].mean() for c in cols] for r in rows])
