"""Weight-matrix statistics: norms, spectrum-derived ranks and conditioning, sparsity.

Every 2-D weight is analysed as is; conv kernels [out, in, k, k] as [out, in·k·k]. Computed in float64.
Exact path: the full singular spectrum. Randomized path (min(shape) above a threshold): the top-k
singular values by a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011),
with a probabilistic a-posteriori bound on their relative error reported next to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from microscope.figures import Figure, Undefined


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


PROBE_FAILURE_EXP = 10  # the residual bound holds with probability ≥ 1 − 10^-PROBE_FAILURE_EXP


def randomized_singular_values(
    m: np.ndarray, rank: int, oversample: int = 10, power_iters: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`rank` singular values of m and a bound on the relative error of each.

    Q spans the range of m·Ω (Ω Gaussian, `rank + oversample` columns) refined by power iterations;
    σ_i(QᵀM) ≤ σ_i(M) ≤ sqrt(σ_i(QᵀM)² + e²) with e = ‖(I − QQᵀ)M‖₂ (Weyl on MᵀM = BᵀB + EᵀE), and
    e ≤ 10·sqrt(2/π)·max_j ‖(I − QQᵀ)M ω_j‖ over 10 fresh probes with probability ≥ 1 − 10⁻¹⁰
    (Halko et al. 2011, eq. 4.3). Bound i is sqrt(1 + (e/σ_i)²) − 1: tight for the leading values, loose
    near the cut when the spectrum decays slowly (then raise the rank)."""
    rng = np.random.default_rng(seed)
    k = min(rank + oversample, min(m.shape))
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], k)))
    for _ in range(power_iters):  # re-orthonormalised subspace iteration: sharpens a slowly decaying spectrum
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    b = q.T @ m
    sv = np.linalg.svd(b, compute_uv=False)[:rank]
    probes = m @ rng.standard_normal((m.shape[1], PROBE_FAILURE_EXP))
    resid = probes - q @ (q.T @ probes)
    e = 10 * np.sqrt(2 / np.pi) * float(np.linalg.norm(resid, axis=0).max())
    with np.errstate(divide="ignore"):
        bound = np.sqrt(1 + (e / sv) ** 2) - 1
    return sv, bound


def matrix_stats(
    w: np.ndarray,
    near_zero: float = 1e-6,
    cond_floor: float = 1e-12,
    exact_max_dim: int | None = None,
    rank: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Statistics of one weight matrix. condition = σmax / max(σmin, cond_floor·σmax) so a singular matrix
    reports 1/cond_floor instead of infinity; effective rank = exp(entropy of σ / Σσ) (Roy & Vetterli).

    When min(shape) > exact_max_dim the randomized path computes the top `rank` singular values only:
    `spectrum_error` bounds the relative error of σmax (so of the spectral and stable ranks),
    `spectrum_error_max` that of every kept value; σmin is unknown, so the condition number is undefined; the
    effective rank spreads the energy not captured (‖W‖²_F − Σσ²) evenly over the missing values and is
    marked `effective_rank_estimated`."""
    m = as_matrix(np.asarray(w))
    if m is None:
        raise ValueError(f"a weight of shape {np.shape(w)} is not a matrix")
    m = m.astype(np.float64)
    flat = m.ravel()
    fro = float(np.sqrt(flat @ flat))  # one BLAS dot instead of an elementwise square and a sum
    absm = np.abs(flat)
    randomized = exact_max_dim is not None and min(m.shape) > exact_max_dim and rank < min(m.shape)
    if randomized:
        sv, bounds = randomized_singular_values(m, rank, seed=seed)
        missing = min(m.shape) - sv.size
        tail = np.full(missing, np.sqrt(max(fro**2 - float(sv @ sv), 0.0) / missing))
        full = np.concatenate([sv, tail])
    else:
        sv, bounds = singular_values(m), np.zeros(1)
        full = sv
    smax = float(sv[0]) if sv.size else 0.0
    smin = float(sv[-1]) if sv.size else 0.0
    p = full / full.sum() if full.sum() > 0 else full
    nz = p[p > 0]
    cond: Figure
    if randomized:
        cond = Undefined(
            f"randomized spectrum path (top {sv.size} of {min(m.shape)} singular values): σmin is unknown, "
            "so the condition number is undefined"
        )
    elif smax == 0:
        cond = Undefined("all-zero matrix (σmax = 0): the condition number is undefined")
    else:
        cond = smax / max(smin, cond_floor * smax)
    return {
        "shape": list(m.shape),
        "l1": float(absm.sum()),
        "frobenius": fro,
        "spectral_norm": smax,
        "condition_number": cond,
        "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "stable_rank": fro**2 / smax**2 if smax > 0 else 0.0,
        "sparsity": float(np.count_nonzero(absm < near_zero) / absm.size),
        "spectrum": "randomized" if randomized else "exact",
        "spectrum_error": float(bounds[0]) if bounds.size else 0.0,
        "spectrum_error_max": float(bounds.max()) if bounds.size else 0.0,
        "effective_rank_estimated": randomized,
        "n_singular_values": int(sv.size),
        "singular_values": sv,
    }


EVALS_THRESH = 1e-5  # eigenvalues below this are numerical zeros (WeightWatcher's threshold)
MIN_FIT_EVALS = 20  # below this the continuous power-law MLE is too noisy to report


FIT_FIGURES = ("alpha", "alpha_weighted", "xmin", "ks_distance", "sigma")


def _no_fit(reason: str) -> dict[str, Figure]:
    return dict.fromkeys(FIT_FIGURES, Undefined(reason)) | {"n_tail": 0.0}


def power_law_fit(singular_values: np.ndarray) -> dict[str, Figure]:
    """Power-law fit of the empirical spectral density of WᵀW, as WeightWatcher defines it: eigenvalues
    λ = σ², the continuous power-law MLE α = 1 + n / Σ log(λ_i / λ_min) for every candidate λ_min, and the
    λ_min whose fit has the smallest Kolmogorov–Smirnov distance. Also α̂ = α · log10 λmax.
    Undefined (with the reason) when there are too few eigenvalues, or no tail gives a power law (α > 1)."""
    evals = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)
    evals = evals[evals > EVALS_THRESH]
    n_all = len(evals)
    if n_all < MIN_FIT_EVALS:
        return _no_fit(
            f"{n_all} eigenvalues of WᵀW above {EVALS_THRESH:g}: the power-law fit needs at least {MIN_FIT_EVALS}"
        )
    log_e = np.log(evals)
    # Suffix sums give every candidate's MLE in O(n); the KS distances of all candidates at once as a
    # masked [candidates × tail] matrix, in row chunks so memory stays bounded for large spectra.
    suffix = np.cumsum(log_e[::-1])[::-1]
    idx = np.arange(n_all - 1)
    n_tail = n_all - idx
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + n_tail / (suffix[:-1] - n_tail * log_e[:-1])
    ks = np.full(n_all - 1, np.inf)
    step = max(1, 2_000_000 // n_all)
    j = np.arange(n_all)
    for lo in range(0, n_all - 1, step):
        rows = idx[lo : lo + step]
        a = alphas[rows][:, None]
        dlog = log_e[None, :] - log_e[rows][:, None]  # log(λ_j / λ_i)
        rank = (j[None, :] - rows[:, None]) / n_tail[rows][:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            dev = np.abs(1 - np.exp((1 - a) * dlog) - rank)
        dev[j[None, :] < rows[:, None]] = 0.0  # only the tail j ≥ i counts
        ks[lo : lo + step] = dev.max(axis=1)
    ks[~(alphas > 1)] = np.inf
    i = int(np.argmin(ks))  # the first minimum, as the loop over candidates picks
    if not np.isfinite(ks[i]):
        return _no_fit("no tail of the spectrum fits a power law (a flat spectrum, or every candidate gives α ≤ 1)")
    best = (float(ks[i]), i, float(alphas[i]))
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


def mp_spikes(singular_values: np.ndarray, shape: tuple[int, int], frobenius: float | None = None) -> int:
    """Eigenvalues of WᵀW/N beyond the Marchenko–Pastur bulk edge σ²(1 + 1/√Q)², Q = N/M ≥ 1, with σ²
    estimated from the matrix's own variance: the count of 'spikes' a random matrix would not have.
    Pass `frobenius` when only the top singular values are known (the randomized path)."""
    n, m = max(shape), min(shape)
    sv = np.asarray(singular_values, dtype=np.float64)
    evals = sv**2 / n
    energy = frobenius**2 if frobenius is not None else float((sv**2).sum())
    var = energy / (n * m)  # mean squared entry
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
