"""Weight statistics against float64 NumPy/SciPy references on random and structured matrices."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import svdvals

from microscope.figures import Undefined
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


def test_power_law_alpha_agrees_with_weightwatcher() -> None:
    """The same model through WeightWatcher's analyze() and through ours: alpha within 0.05 per layer."""
    import torch

    ww = pytest.importorskip("weightwatcher", reason="weightwatcher is a dev dependency")
    from microscope.spectra import power_law_fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(120, 200), torch.nn.ReLU(), torch.nn.Linear(200, 90), torch.nn.ReLU(), torch.nn.Linear(90, 60)
    )
    with torch.no_grad():  # heavy-tailed weights, so the fits are not all at the MP bulk
        for layer in model[::2]:
            layer.weight.copy_(torch.from_numpy(np.random.default_rng(1).standard_t(3, layer.weight.shape)))
    details = ww.WeightWatcher(model=model).analyze(plot=False)
    theirs = details["alpha"].to_numpy()
    ours = [power_law_fit(svdvals(layer.weight.detach().double().numpy()))["alpha"] for layer in model[::2]]
    assert len(theirs) == 3
    np.testing.assert_allclose(ours, theirs, atol=0.05)
    weighted = [
        power_law_fit(svdvals(layer.weight.detach().double().numpy()))["alpha_weighted"] for layer in model[::2]
    ]
    np.testing.assert_allclose(weighted, details["alpha_weighted"].to_numpy(), atol=0.05 * 3)


def test_power_law_recovers_a_known_exponent_and_mp_spikes() -> None:
    from microscope.spectra import mp_spikes, power_law_fit

    rng = np.random.default_rng(0)
    # Eigenvalues drawn from a Pareto law with density ∝ λ^(−2.5): singular values are their square roots.
    lam = (1 - rng.random(4000)) ** (-1 / 1.5)
    fit = power_law_fit(np.sqrt(lam))
    assert abs(fit["alpha"] - 2.5) < 0.1
    few = power_law_fit(np.ones(5))  # 5 eigenvalues: too few to fit, and the figure says so
    assert isinstance(few["alpha"], Undefined) and "needs at least 20" in few["alpha"].reason
    flat = power_law_fit(np.ones(40))  # no tail is a power law
    assert isinstance(flat["alpha"], Undefined) and flat["n_tail"] == 0
    w = rng.standard_normal((400, 100))
    assert mp_spikes(svdvals(w), w.shape) <= 2  # pure noise: (almost) nothing beyond the bulk edge
    spiked = w + 30 * np.outer(rng.standard_normal(400), rng.standard_normal(100)) / 20
    assert mp_spikes(svdvals(spiked), spiked.shape) >= 1


def test_esd_histogram_integrates_to_one() -> None:
    from microscope.spectra import esd_histogram

    sv = np.sqrt(np.random.default_rng(0).pareto(2.0, 2000) + 1)
    h = esd_histogram(sv, bins=20)
    lam = 10 ** np.asarray(h["log10_lambda"])
    dens = 10 ** np.asarray(h["log10_density"])
    # Riemann sum over log-spaced bins: Σ density · width ≈ 1 (empty bins were dropped, hence ≤ 1).
    edges_ratio = (sv.max() ** 2 / sv.min() ** 2) ** (1 / 20)
    widths = lam * (np.sqrt(edges_ratio) - 1 / np.sqrt(edges_ratio))
    assert 0.99 < float((dens * widths).sum()) <= 1.0 + 1e-9


def test_randomized_path_is_within_its_stated_bound() -> None:
    """Top-k singular values from the randomized path: every one within the reported relative-error bound
    of SciPy's exact values, the bound itself small on a decaying spectrum and honest on a flat one."""
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((700, 500)))
    v, _ = np.linalg.qr(rng.standard_normal((500, 500)))
    decaying = (u * (1.0 / np.arange(1, 501) ** 1.5)) @ v.T  # σ_i = i^-1.5, like a trained layer's head
    for w, small in ((decaying, True), (rng.standard_normal((700, 500)), False)):
        s = matrix_stats(w, exact_max_dim=256, rank=64)
        exact = svdvals(w)
        assert s["spectrum"] == "randomized" and len(s["singular_values"]) == 64
        rel = np.abs(s["singular_values"] - exact[:64]) / exact[:64]
        assert rel[0] <= s["spectrum_error"] and np.all(rel <= s["spectrum_error_max"]), (rel, s["spectrum_error"])
        assert np.all(s["singular_values"] <= exact[:64] * (1 + 1e-12))  # a lower bound, as the theory says
        assert (s["spectrum_error"] < 1e-2) == small  # a flat spectrum: the top value is honestly uncertain
        assert close(s["frobenius"], np.linalg.norm(w)) and close(
            s["stable_rank"], np.linalg.norm(w) ** 2 / s["spectral_norm"] ** 2
        )
        assert isinstance(s["condition_number"], Undefined) and s["effective_rank_estimated"]
        assert "σmin is unknown" in s["condition_number"].reason
    exact_path = matrix_stats(decaying, exact_max_dim=500, rank=64)  # at the threshold: exact
    assert exact_path["spectrum"] == "exact" and exact_path["spectrum_error"] == exact_path["spectrum_error_max"] == 0


def test_randomized_mp_spikes_use_the_frobenius_energy() -> None:
    from microscope.spectra import mp_spikes

    w = np.random.default_rng(4).standard_normal((600, 400))
    w[:, 0] *= 30  # one spike
    full = matrix_stats(w)
    top = matrix_stats(w, exact_max_dim=100, rank=50)
    assert (
        mp_spikes(full["singular_values"], (600, 400))
        == mp_spikes(top["singular_values"], (600, 400), frobenius=top["frobenius"])
        == 1
    )
