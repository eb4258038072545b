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


GRAM_MAX_COND = 1e4  # beyond this, σ² from the Gram matrix loses the small singular values: use the SVD


def singular_values(m: np.ndarray) -> np.ndarray:
    """Descending singular values in float64. Fast path: eigenvalues of the smaller Gram matrix (one
    GEMM + a symmetric eigensolver, several times faster than an SVD); its relative error on σ_i is about
    ε·(σmax/σ_i)², so when the condition number exceeds GRAM_MAX_COND the exact SVD is used instead."""
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T  # [min, min]
    ev = np.linalg.eigvalsh(gram)[::-1]
    sv = np.sqrt(np.clip(ev, 0, None))
    if sv.size == 0 or sv[0] == 0 or sv[-1] < sv[0] / GRAM_MAX_COND:
        return np.linalg.svd(m, compute_uv=False)
    return sv


def matrix_stats(w: np.ndarray, near_zero: float = 1e-6, cond_floor: float = 1e-12) -> dict[str, Any]:
    """Statistics of one weight matrix. condition = σmax / max(σmin, cond_floor·σmax) so a singular matrix
    reports 1/cond_floor instead of infinity; effective rank = exp(entropy of σ / Σσ) (Roy & Vetterli)."""
    m = as_matrix(np.asarray(w))
    if m is None:
        raise ValueError(f"a weight of shape {np.shape(w)} is not a matrix")
    m = m.astype(np.float64)
    sv = singular_values(m)
    flat = m.ravel()
    fro = float(np.sqrt(flat @ flat))  # one BLAS dot instead of an elementwise square and a sum
    absm = np.abs(flat)
    smax = float(sv[0]) if sv.size else 0.0
    smin = float(sv[-1]) if sv.size else 0.0
    p = sv / sv.sum() if sv.sum() > 0 else sv
    nz = p[p > 0]
    return {
        "shape": list(m.shape),
        "l1": float(absm.sum()),
        "frobenius": fro,
        "spectral_norm": smax,
        "condition_number": smax / max(smin, cond_floor * smax) if smax > 0 else float("nan"),
        "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "stable_rank": fro**2 / smax**2 if smax > 0 else 0.0,
        "sparsity": float(np.count_nonzero(absm < near_zero) / absm.size),
        "singular_values": sv,
    }


EVALS_THRESH = 1e-5  # eigenvalues below this are numerical zeros (WeightWatcher's threshold)
MIN_FIT_EVALS = 20  # below this the continuous power-law MLE is too noisy to report


def power_law_fit(singular_values: np.ndarray) -> dict[str, float]:
    """Power-law fit of the empirical spectral density of WᵀW, as WeightWatcher defines it: eigenvalues
    λ = σ², the continuous power-law MLE α = 1 + n / Σ log(λ_i / λ_min) for every candidate λ_min, and the
    λ_min whose fit has the smallest Kolmogorov–Smirnov distance. Also α̂ = α · log10 λmax."""
    evals = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)
    evals = evals[evals > EVALS_THRESH]
    n_all = len(evals)
    if n_all < MIN_FIT_EVALS:
        return {
            "alpha": float("nan"),
            "alpha_weighted": float("nan"),
            "xmin": float("nan"),
            "ks_distance": float("nan"),
            "sigma": float("nan"),
            "n_tail": 0.0,
        }
    log_e = np.log(evals)
    # Suffix sums give every candidate's MLE in O(n); the KS distance needs the tail, O(n²) worst case.
    suffix = np.cumsum(log_e[::-1])[::-1]
    best = (np.inf, 0, 0.0)
    for i in range(n_all - 1):
        n = n_all - i
        alpha = 1 + n / (suffix[i] - n * log_e[i])
        if alpha <= 1:
            continue
        tail = evals[i:]
        d = np.max(np.abs(1 - (tail / evals[i]) ** (1 - alpha) - np.arange(n) / n))
        if d < best[0]:
            best = (d, i, alpha)
    d, i, alpha = best
    lam_max = evals[-1]
    return {
        "alpha": float(alpha),
        "alpha_weighted": float(alpha * np.log10(lam_max)),
        "xmin": float(evals[i]),
        "ks_distance": float(d),
        "sigma": float((alpha - 1) / np.sqrt(n_all - i)),
        "n_tail": float(n_all - i),
    }


def mp_spikes(singular_values: np.ndarray, shape: tuple[int, int]) -> int:
    """Eigenvalues of WᵀW/N beyond the Marchenko–Pastur bulk edge σ²(1 + 1/√Q)², Q = N/M ≥ 1, with σ²
    estimated from the matrix's own variance: the count of 'spikes' a random matrix would not have."""
    n, m = max(shape), min(shape)
    sv = np.asarray(singular_values, dtype=np.float64)
    evals = sv**2 / n
    var = float((sv**2).sum() / (n * m))  # mean squared entry
    edge = var * (1 + np.sqrt(m / n)) ** 2
    return int((evals > edge).sum())


def esd_histogram(singular_values: np.ndarray, bins: int = 30) -> dict[str, list[float]]:
    """The empirical spectral density of WᵀW on log-spaced bins: (log10 λ at bin centres, log10 density)."""
    evals = np.asarray(singular_values, dtype=np.float64) ** 2
    evals = evals[evals > EVALS_THRESH]
    if evals.size < 2:
        return {"log10_lambda": [], "log10_density": []}
    edges = np.logspace(np.log10(evals.min()), np.log10(evals.max()), bins + 1)
    counts, _ = np.histogram(evals, bins=edges)
    dens = counts / (evals.size * np.diff(edges))
    keep = dens > 0
    centres = np.sqrt(edges[:-1] * edges[1:])
    return {"log10_lambda": np.log10(centres[keep]).tolist(), "log10_density": np.log10(dens[keep]).tolist()}
