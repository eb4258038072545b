"""Weight statistics against float64 NumPy/SciPy references on random and structured matrices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import svdvals

from microscope.spectra import as_matrix, matrix_stats

REL = 1e-6


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(b))


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (64, 64)])
def test_random_matrices(shape: tuple[int, int]) -> None:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    s = matrix_stats(w)
    sv = svdvals(w.astype(np.float64))
    p = sv / sv.sum()
    assert close(s["l1"], np.abs(w.astype(np.float64)).sum())
    assert close(s["frobenius"], np.linalg.norm(w.astype(np.float64), "fro"))
    assert close(s["spectral_norm"], np.linalg.norm(w.astype(np.float64), 2))
    assert close(s["condition_number"], np.linalg.cond(w.astype(np.float64)))
    assert close(s["effective_rank"], np.exp(-(p * np.log(p)).sum()))
    assert close(s["stable_rank"], (sv**2).sum() / sv[0] ** 2)
    np.testing.assert_allclose(s["singular_values"], sv, rtol=REL)


def test_structured_closed_forms() -> None:
    eye = np.eye(8)
    s = matrix_stats(eye)
    assert close(s["effective_rank"], 8) and close(s["stable_rank"], 8) and close(s["condition_number"], 1)
    rank1 = np.outer(np.arange(1, 6), np.ones(4))
    s = matrix_stats(rank1)
    assert close(s["effective_rank"], 1) and close(s["stable_rank"], 1)
    assert close(s["condition_number"], 1e12)  # singular: σmax / (floor · σmax)
    d = np.diag([4.0, 2.0, 1.0, 1.0])
    s = matrix_stats(d)
    assert close(s["spectral_norm"], 4) and close(s["condition_number"], 4) and close(s["stable_rank"], 22 / 16)
    sparse = np.zeros((10, 10))
    sparse[0, 0] = 1
    assert close(matrix_stats(sparse)["sparsity"], 0.99)


def test_conv_kernels_are_reshaped_and_vectors_refused() -> None:
    k = np.random.default_rng(1).standard_normal((8, 3, 3, 3))
    assert as_matrix(k).shape == (8, 27)
    assert close(matrix_stats(k)["spectral_norm"], np.linalg.norm(k.reshape(8, 27), 2))
    with pytest.raises(ValueError, match="not a matrix"):
        matrix_stats(np.ones(5))
