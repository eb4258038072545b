"""CKA against a direct NumPy implementation of the HSIC definition, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from microscope.cka import cka_matrix, debiased_linear_cka, linear_cka


def hsic_reference(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC(K, L) = tr(K H L H) / (n − 1)² with linear kernels: the textbook n×n form."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(x @ x.T @ h @ y @ y.T @ h)) / (n - 1) ** 2


def test_linear_cka_matches_the_hsic_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 7))
    y = x @ rng.standard_normal((7, 5)) + 0.5 * rng.standard_normal((60, 5))
    ref = hsic_reference(x, y) / np.sqrt(hsic_reference(x, x) * hsic_reference(y, y))
    assert abs(linear_cka(x, y) - ref) < 1e-12


def test_invariances() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 6))
    y = rng.standard_normal((80, 9))
    assert abs(linear_cka(x, x) - 1) < 1e-12
    q = ortho_group.rvs(6, random_state=2)
    assert abs(linear_cka(x, x @ q) - 1) < 1e-12  # orthogonal transform
    assert abs(linear_cka(x, 3.7 * x) - 1) < 1e-12  # isotropic scaling
    assert abs(linear_cka(x @ q * 2.0, y) - linear_cka(x, y)) < 1e-12
    assert 0 <= linear_cka(x, y) < 0.5  # independent noise: low similarity


def test_debiased_cka() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 50))
    y = rng.standard_normal((200, 50))
    assert abs(debiased_linear_cka(x, x) - 1) < 1e-12
    # For independent high-dimensional features the biased estimate is inflated; the debiased one is not.
    assert abs(debiased_linear_cka(x, y)) < 0.05 < linear_cka(x, y)
    with pytest.raises(ValueError, match="at least 4"):
        debiased_linear_cka(x[:3], y[:3])


def test_cka_matrix_is_symmetric_with_unit_diagonal() -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal((50, 8))
    names, m = cka_matrix(
        {"a": base, "b": base + 0.1 * rng.standard_normal((50, 8)), "c": rng.standard_normal((50, 4))}
    )
    assert names == ["a", "b", "c"] and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    assert m[0, 1] > 0.95 > m[0, 2]
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(base, base[:10])
