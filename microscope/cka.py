"""Centered kernel alignment between two representations of the same inputs (Kornblith et al. 2019).

Linear CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X [n, d1], Y [n, d2]; the debiased
variant replaces the HSIC estimates by their unbiased forms (Song et al. 2012; Nguyen et al. 2021).
Computed in float64 from d×d Gram products, so n can be large while memory stays O(d²).
"""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides: {x.shape[0]} rows vs {y.shape[0]}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _unbiased_hsic(gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """Unbiased HSIC of two n×n Gram matrices (diagonals zeroed)."""
    n = gram_x.shape[0]
    k = gram_x.copy()
    m = gram_y.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    term1 = np.sum(k * m)
    term2 = k.sum() * m.sum() / ((n - 1) * (n - 2))
    term3 = 2 * (k.sum(0) @ m.sum(0)) / (n - 2)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def debiased_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA (needs n > 3); uses n×n Grams, so call it on a token sample."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    gx, gy = x @ x.T, y @ y.T
    return float(_unbiased_hsic(gx, gy) / np.sqrt(_unbiased_hsic(gx, gx) * _unbiased_hsic(gy, gy)))


def cka_matrix(reps: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Linear CKA between every pair of named representations of the same tokens."""
    names = sorted(reps)
    m = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = linear_cka(reps[a], reps[names[j]])
    return names, m
