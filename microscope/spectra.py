"""Weight-matrix statistics: norms, spectrum-derived ranks and conditioning, sparsity.

Every 2-D weight is analysed as is; conv kernels [out, in, k, k] as [out, in·k·k]. Computed in float64
from the full singular spectrum (the exact path).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_matrix(w: np.ndarray) -> np.ndarray | None:
    """The matrix a weight tensor is analysed as; None for vectors and scalars (biases, norms)."""
    if w.ndim < 2:
        return None
    return w.reshape(w.shape[0], -1)


def matrix_stats(w: np.ndarray, near_zero: float = 1e-6, cond_floor: float = 1e-12) -> dict[str, Any]:
    """Statistics of one weight matrix. condition = σmax / max(σmin, cond_floor·σmax) so a singular matrix
    reports 1/cond_floor instead of infinity; effective rank = exp(entropy of σ / Σσ) (Roy & Vetterli)."""
    m = as_matrix(np.asarray(w))
    if m is None:
        raise ValueError(f"a weight of shape {np.shape(w)} is not a matrix")
    m = m.astype(np.float64)
    sv = np.linalg.svd(m, compute_uv=False)  # descending
    fro = float(np.sqrt((m * m).sum()))
    smax = float(sv[0]) if sv.size else 0.0
    smin = float(sv[-1]) if sv.size else 0.0
    p = sv / sv.sum() if sv.sum() > 0 else sv
    nz = p[p > 0]
    return {
        "shape": list(m.shape),
        "l1": float(np.abs(m).sum()),
        "frobenius": fro,
        "spectral_norm": smax,
        "condition_number": smax / max(smin, cond_floor * smax) if smax > 0 else float("nan"),
        "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "stable_rank": fro**2 / smax**2 if smax > 0 else 0.0,
        "sparsity": float((np.abs(m) < near_zero).mean()),
        "singular_values": sv,
    }
