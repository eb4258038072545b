"""Randomized-smoothing certificates against independent references: closed forms, scipy's beta and binomial
distributions, statsmodels' Clopper–Pearson interval (when installed), and a linear classifier whose noisy
class probability is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from microscope.reliability.smoothing import certified_accuracy_curve, certify, clopper_pearson_lower

ALPHA = 0.001


class Constant(nn.Module):
    """Always class 3 of 5, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 5)
        logits[:, 3] = 1.0
        return logits


class Linear(nn.Module):
    """Logits (w·x + b, 0) on 1×1×2 inputs, in float64 so the decision rule is the exact half-plane."""

    def __init__(self, w: tuple[float, float], b: float):
        super().__init__()
        self.w, self.b = torch.tensor(w, dtype=torch.float64), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).double() @ self.w + self.b
        return torch.stack([s, torch.zeros_like(s)], dim=1)


class Random(nn.Module):
    """A uniformly random class of 10 per call, from its own seeded generator."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), 10, generator=self.gen)


W, B, SIGMA = (2.0, 1.0), -1.5, 0.25  # class 0 where 2·x1 + x2 > 1.5; x = (t, t) sits on the boundary at t = 1/2


def _linear_inputs(ps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (t, t) whose exact class-0 probability under noise is Φ((3t − 1.5)/(σ‖w‖)) = p."""
    t = 0.5 + SIGMA * np.hypot(*W) * norm.ppf(ps) / 3
    return np.repeat(t.astype(np.float32), 2).reshape(-1, 1, 1, 2), np.zeros(len(ps), dtype=np.int64)


def _exact_p(x: np.ndarray) -> np.ndarray:
    """P(w·(x + ε) + b > 0) = Φ((w·x + b)/(σ‖w‖)), from the float32 inputs actually passed."""
    s = x.reshape(-1, 2).astype(np.float64) @ np.array(W) + B
    return norm.cdf(s / (SIGMA * np.hypot(*W)))


@pytest.mark.parametrize(("n_a", "n"), [(0, 10), (1, 10), (7, 10), (600, 1000), (999, 1000), (1000, 1000)])
def test_bound_is_one_sided_clopper_pearson(n_a: int, n: int) -> None:
    """Equal to beta.ppf(α, nA, n−nA+1) (1e-15) and solving P(Bin(n, L) ≥ nA) = α by scipy's binomial (1e-9)."""
    low = clopper_pearson_lower(n_a, n, ALPHA)
    if n_a == 0:
        assert low == 0.0
        return
    assert low == pytest.approx(beta.ppf(ALPHA, n_a, n - n_a + 1), abs=1e-15)
    assert binom.sf(n_a - 1, n, low) == pytest.approx(ALPHA, rel=1e-9)
    if n_a == n:  # all successes: P(Bin(n, L) = n) = L^n = α
        assert abs(low - ALPHA ** (1 / n)) < 1e-12


def test_constant_classifier_closed_form() -> None:
    """nA = n everywhere, so pA_lower = α^(1/n) and R = σ·Φ⁻¹(α^(1/n)) ≈ 0.551 for σ = 0.25, n = 500."""
    x = np.random.default_rng(0).random((6, 1, 4, 4), dtype=np.float32)
    y = np.array([3, 3, 0, 3, 1, 3])
    n, sigma = 500, 0.25
    out = certify(Constant(), x, y, sigma, n0=20, n=n, alpha=ALPHA, batch_size=128)
    r = sigma * norm.ppf(ALPHA ** (1 / n))
    assert out["prediction"] == [3] * 6 and out["n_a"] == [n] * 6 and out["abstained"] == 0
    assert np.allclose(out["p_a_lower"], ALPHA ** (1 / n), rtol=0, atol=1e-12)
    assert out["correct"] == [True, True, False, True, False, True]
    assert np.allclose(out["radius"], np.where(y == 3, r, 0.0), rtol=0, atol=1e-9)
    assert out["certified_accuracy"] == {0.0: 4 / 6, 0.25: 4 / 6, 0.5: 4 / 6, 0.75: 0.0, 1.0: 0.0}
    assert certified_accuracy_curve(out["radius"], out["correct"], [r - 1e-9, r + 1e-9]) == {
        r - 1e-9: 4 / 6,
        r + 1e-9: 0.0,
    }
    assert out["clean_accuracy"] == 4 / 6
    assert (out["sigma"], out["n0"], out["n"], out["alpha"], out["samples"]) == (sigma, 20, n, ALPHA, 6)
    assert "Clopper-Pearson" in out["bound"] and "0.001" in out["bound"]
    json.dumps(out)


def _slack(p: np.ndarray, n: int) -> np.ndarray:
    """R_true − R_est had nA come in 4 binomial s.e. below n·p: the Clopper–Pearson slack plus sampling error."""
    n_a = np.floor(n * p - 4 * np.sqrt(n * p * (1 - p))).astype(int)
    low = np.array([clopper_pearson_lower(int(k), n, ALPHA) for k in n_a])
    return SIGMA * (norm.ppf(p) - norm.ppf(low))


def test_linear_classifier_radius_is_conservative_and_tight() -> None:
    """Class-0 probability p = Φ((w·x+b)/(σ‖w‖)) exactly; the smoothed classifier's true radius is σ·Φ⁻¹(p).

    n = 20,000. nA/n lies within 4 binomial s.e. of p. R_est ≤ R_true because pA_lower ≤ p holds with
    probability ≥ 1 − α = 0.999 per input (seed 0 is simply the first seed; none was searched). The gap
    R_true − R_est is the Clopper–Pearson slack (≈ z_{1−α} ≈ 3.1 s.e. in p: 0.028σ–0.035σ here) ± sampling error
    (≈ 0.01σ): asserted ≤ the gap at nA 4 s.e. low (0.064σ–0.075σ). A flat 0.05σ would sit only ~2 s.d. above
    the mean gap (it failed 3 of 100 seeds). The boundary input (p = 1/2) abstains.
    """
    x, y = _linear_inputs([0.6, 0.75, 0.85, 0.5])
    p = _exact_p(x)
    assert abs(p[3] - 0.5) < 1e-15
    n = 20_000
    out = certify(Linear(W, B), x, y, SIGMA, n0=100, n=n, alpha=ALPHA, batch_size=10_000, seed=0)
    assert out["prediction"] == [0, 0, 0, -1]
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(np.array(out["n_a"][:3]) / n - p[:3]) < 4 * se[:3])
    r_est, r_true = np.array(out["radius"][:3]), SIGMA * norm.ppf(p[:3])
    assert np.all(r_est <= r_true + 1e-9)
    assert np.all(r_true - r_est <= _slack(p[:3], n))
    assert out["radius"][3] == 0.0 and out["correct"] == [True, True, True, False]


def test_deterministic_per_seed_and_seed_sensitive() -> None:
    x, y = _linear_inputs([0.75, 0.9])
    run = {s: certify(Linear(W, B), x, y, SIGMA, n0=50, n=2000, batch_size=500, seed=s) for s in (0, 1)}
    assert certify(Linear(W, B), x, y, SIGMA, n0=50, n=2000, batch_size=500, seed=0) == run[0]
    assert run[1]["n_a"] != run[0]["n_a"]


def test_random_classifier_abstains() -> None:
    """pA ≈ 1/10, so pA_lower ≥ 1/2 would need ≥ ~550 wins of 1000 (binomial tail < 1e-200): all abstain."""
    x = np.random.default_rng(1).random((5, 1, 4, 4), dtype=np.float32)
    out = certify(Random(), x, np.arange(5), 0.5, n=1000)
    assert out["abstained"] == 5 and out["prediction"] == [-1] * 5
    assert out["radius"] == [0.0] * 5 and not any(out["correct"])
    assert set(out["certified_accuracy"].values()) == {0.0}


def test_conv_model_runs() -> None:
    """An untrained DigitsCNN end to end: plain-Python, JSON-ready results of the right lengths."""
    from microscope.models.vision import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    out = certify(model, x, np.array([0, 1, 2]), 0.25, n0=20, n=200, batch_size=64)
    assert len(out["prediction"]) == len(out["radius"]) == len(out["correct"]) == 3
    assert all(isinstance(v, int) for v in out["prediction"]) and 0.0 <= out["clean_accuracy"] <= 1.0
    json.loads(json.dumps(out))


def test_certified_accuracy_curve_by_hand() -> None:
    curve = certified_accuracy_curve([0.0, 0.3, 0.6, 0.0], [False, True, True, True], [0.0, 0.3, 0.5, 0.7])
    assert curve == {0.0: 0.75, 0.3: 0.5, 0.5: 0.25, 0.7: 0.0}
    with pytest.raises(ValueError, match="equal, non-empty"):
        certified_accuracy_curve([0.1], [True, False], [0.0])


GOOD_X = np.full((2, 1, 2, 2), 0.5, dtype=np.float32)
GOOD_Y = np.array([0, 1])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sigma": 0.0}, "sigma must be"),
        ({"sigma": float("nan")}, "sigma must be"),
        ({"n0": 0}, "n0 must be"),
        ({"n": 0}, "n must be"),
        ({"n": 10.5}, "n must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"alpha": 0.0}, "alpha must"),
        ({"alpha": 0.5}, "alpha must"),
        ({"x": GOOD_X[:, 0]}, "x must be float images"),
        ({"x": GOOD_X.astype(np.uint8)}, "x must be float images"),
        ({"x": GOOD_X[:0], "y": GOOD_Y[:0]}, "x is empty"),
        ({"x": GOOD_X * 255}, r"in \[0, 1\]"),
        ({"x": GOOD_X * np.nan}, r"in \[0, 1\]"),
        ({"y": GOOD_Y.astype(float)}, "y must be 1-D integer"),
        ({"y": GOOD_Y[:, None]}, "y must be 1-D integer"),
        ({"y": GOOD_Y[:1]}, "pass matching samples"),
        ({"y": np.array([0, -1])}, "y must be class indices >= 0"),
    ],
)
def test_bad_inputs_are_one_line_errors(change: dict, match: str) -> None:
    kwargs = {"x": GOOD_X, "y": GOOD_Y, "sigma": 0.25, "n0": 10, "n": 10} | change
    with pytest.raises(ValueError, match=match) as err:
        certify(Constant(), **kwargs)
    assert "\n" not in str(err.value) and ";" in str(err.value)
