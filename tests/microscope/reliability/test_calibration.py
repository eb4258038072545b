"""Calibration figures against independent references: torchmetrics for the top-label binned errors,
SciPy/direct formulas for NLL and Brier, hand-written loops for ACE and classwise ECE, closed forms for AURC,
and a synthetic model whose true temperature is known for temperature scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import digamma, log_softmax, softmax

from microscope.reliability.calibration import (
    calibration_figures,
    fit_temperature,
    risk_coverage,
    temperature_scaled,
)


def miscalibrated(n: int, n_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z ~ N(0, 2²) and labels drawn from softmax(z / 1.5): informative but overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, n_classes))
    p = softmax(z / 1.5, axis=1)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(labels, n_classes - 1)


def sample_labels(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.minimum((rng.random((p.shape[0], 1)) > np.cumsum(p, axis=1)).sum(axis=1), p.shape[1] - 1)


# --- top-label binned errors vs torchmetrics (tolerance 1e-6: torchmetrics casts confidences to float32) ---


@pytest.mark.parametrize(("norm", "key"), [("l1", "ece"), ("max", "mce"), ("l2", "rms_ce")])
def test_binned_errors_match_torchmetrics(norm: str, key: str) -> None:
    import torch  # torchmetrics is the reference: a missing install fails this test, it does not skip
    from torchmetrics.functional.classification import multiclass_calibration_error

    z, y = miscalibrated(20_000)
    p = softmax(z, axis=1)  # float64 softmax; torchmetrics takes probabilities and casts confidences itself
    top = p.max(axis=1)
    assert 0 < top.min() and top.max() < 1  # strictly inside: the phantom-bin difference cannot arise
    ref = multiclass_calibration_error(
        torch.from_numpy(p), torch.from_numpy(y), num_classes=10, n_bins=15, norm=norm
    ).item()
    ours = calibration_figures(z, y, n_bins=15)[key]
    assert ours > 0.01  # the model is miscalibrated, so the comparison is not 0 vs 0
    assert abs(ours - ref) < 1e-6, (key, ours, ref)


def test_confidence_one_lands_in_last_bin() -> None:
    z = np.array([[0.0, -1000.0], [0.0, -1000.0], [0.3, 0.0], [0.0, 0.0]])
    y = np.array([0, 1, 1, 0])
    assert softmax(z, axis=1)[0, 0] == 1.0  # exactly 1.0 in float64
    fig = calibration_figures(z, y, n_bins=15)
    d = fig["diagram"]
    assert d["count"][-1] == 2  # both p = 1.0 rows, not dropped and not in a 16th bin
    assert d["confidence"][-1] == 1.0 and d["accuracy"][-1] == 0.5
    assert sum(d["count"]) == fig["n"] == 4
    assert len(d["count"]) == len(d["bin_lower"]) == len(d["bin_upper"]) == 15
    assert d["count"][7] == 1  # p = 0.5 exactly, inside (7/15, 8/15]
    assert d["accuracy"][0] is None and d["confidence"][0] is None  # empty bins are null
    json.dumps(fig)  # JSON-ready: plain floats, ints, lists and None


@pytest.mark.parametrize(("n_bins", "bin_of_half"), [(2, 0), (4, 1), (10, 4)])
def test_bin_edges_are_right_closed(n_bins: int, bin_of_half: int) -> None:
    # equal logits give exactly 0.5 (and 0.25) in float64; on an edge, the bin below holds it
    z = np.zeros((2, 2))
    fig = calibration_figures(z, np.array([0, 1]), n_bins=n_bins)
    assert fig["diagram"]["count"][bin_of_half] == 2
    quarter = calibration_figures(np.zeros((1, 4)), np.array([0]), n_bins=4)
    assert quarter["diagram"]["count"] == [1, 0, 0, 0]  # 0.25 is the upper edge of [0, 0.25]


# --- temperature scaling on a model whose true temperature is 2.5 ---


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(1)
    n, c = 50_000, 10
    z_fit, z_eval = rng.normal(0.0, 1.5, size=(n, c)), rng.normal(0.0, 1.5, size=(n, c))
    y_fit, y_eval = sample_labels(softmax(z_fit, axis=1), rng), sample_labels(softmax(z_eval, axis=1), rng)
    t = fit_temperature(2.5 * z_fit, y_fit)
    assert abs(t - 2.5) / 2.5 < 0.03, t  # 3 % tolerance on the recovered temperature
    out = temperature_scaled(2.5 * z_eval, y_eval, 2.5 * z_fit, y_fit, n_bins=15)
    assert out["temperature"] == t
    assert out["before"]["ece"] > 0.05  # overconfident before
    assert out["after"]["ece"] < 0.01
    assert out["after"]["nll"] < out["before"]["nll"]
    assert out["after"]["accuracy"] == out["before"]["accuracy"]  # argmax is invariant to T > 0


def test_temperature_bounds_are_validated() -> None:
    z, y = miscalibrated(100)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, y, bounds=(0.0, 5.0))


# --- ACE, NLL, Brier, classwise ECE against direct references (1e-12) ---


def test_ace_nll_brier_classwise_match_direct_references() -> None:
    z, y = miscalibrated(3_001, n_classes=7, seed=3)  # n not a multiple of n_bins: unequal equal-mass groups
    fig = calibration_figures(z, y, n_bins=15)
    n = len(y)
    p = softmax(z, axis=1)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == y).astype(float)

    order = np.argsort(conf)
    ace = sum(len(g) / n * abs(correct[g].mean() - conf[g].mean()) for g in np.array_split(order, 15))
    assert abs(fig["ace"] - ace) < 1e-12

    assert abs(fig["nll"] - (-log_softmax(z, axis=1)[np.arange(n), y].mean())) < 1e-12
    brier = np.mean([sum((p[i, k] - (k == y[i])) ** 2 for k in range(7)) for i in range(n)])
    assert abs(fig["brier"] - brier) < 1e-12

    per_class = []
    for k in range(7):
        err = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            m = (p[:, k] > lo) & (p[:, k] <= hi) if b else (p[:, k] <= hi)
            if m.any():
                err += m.sum() / n * abs((y[m] == k).mean() - p[m, k].mean())
        per_class.append(err)
    assert abs(fig["classwise_ece"] - np.mean(per_class)) < 1e-12
    assert abs(fig["accuracy"] - correct.mean()) < 1e-15
    scalars = ("n", "n_bins", "accuracy", "ece", "ace", "mce", "rms_ce", "nll", "brier", "classwise_ece")
    assert all(type(fig[k]) in (int, float) for k in scalars)  # plain Python numbers, not NumPy scalars


def test_ace_with_fewer_samples_than_bins() -> None:
    z = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    y = np.array([0, 0, 0])
    p = softmax(z, axis=1)
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    fig = calibration_figures(z, y, n_bins=15)
    assert abs(fig["ace"] - np.mean(np.abs(correct - conf))) < 1e-12  # one sample per group


# --- risk–coverage ---


def test_aurc_perfect_ranking_closed_form() -> None:
    n, m = 1_000, 137  # m errors, all less confident than every correct prediction
    conf = np.linspace(5.0, 0.1, n)
    z = np.stack([conf, np.zeros(n)], axis=1)
    y = np.zeros(n, dtype=int)
    y[n - m :] = 1  # the m least confident are wrong
    out = risk_coverage(z, y)

    def harmonic(k: int) -> float:
        return float(digamma(k + 1) + np.euler_gamma)

    # risk is 0 up to coverage (n-m)/n, then 1 - (n-m)/k; its mean over k = 1..n:
    closed = m / n - (n - m) / n * (harmonic(n) - harmonic(n - m))
    assert abs(out["aurc"] - closed) < 1e-12
    assert out["error_rate"] == m / n
    assert len(out["coverage"]) == len(out["risk"]) == 101
    assert out["coverage"][0] == 1 / n and out["coverage"][-1] == 1.0
    assert out["risk"][-1] == m / n


def test_aurc_constant_confidence_is_error_rate() -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    z = np.zeros((n, 3))  # every row ties at confidence 1/3, predicted class 0 (argmax takes the first)
    y = rng.integers(0, 3, size=n)
    out = risk_coverage(z, y)
    # ties keep input order, so the risk curve is a running error rate of a random sequence: its mean is
    # the error rate up to early-prefix noise, sd ≈ 0.0034 over seeds at this n; tolerance 0.015 (> 4 sd).
    assert abs(out["aurc"] - out["error_rate"]) < 0.015
    assert abs(out["error_rate"] - np.mean(y != 0)) < 1e-15


def test_risk_coverage_small_n_keeps_every_point() -> None:
    z = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    out = risk_coverage(z, np.array([0, 1, 0]))
    assert out["coverage"] == [1 / 3, 2 / 3, 1.0]
    assert out["risk"] == [0.0, 0.5, 1 / 3]
    assert abs(out["aurc"] - (0 + 0.5 + 1 / 3) / 3) < 1e-15


# --- input validation: one line, naming the fix ---


@pytest.mark.parametrize(
    ("logits", "labels", "needle"),
    [
        (np.zeros(4), np.zeros(4, dtype=int), "2-D"),
        (np.zeros((4, 1)), np.zeros(4, dtype=int), "n_classes >= 2"),
        (np.zeros((4, 3)), np.zeros((4, 1), dtype=int), "1-D"),
        (np.zeros((4, 3)), np.zeros(4), "integer"),
        (np.zeros((4, 3)), np.zeros(3, dtype=int), "matching"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "at least one"),
        (np.array([[0.0, np.nan, 1.0]]), np.zeros(1, dtype=int), "NaN"),
        (np.array([[0.0, np.inf, 1.0]]), np.zeros(1, dtype=int), "NaN or inf"),
        (np.zeros((2, 3)), np.array([0, 3]), "remap"),
        (np.zeros((2, 3)), np.array([-1, 0]), "remap"),
    ],
)
@pytest.mark.parametrize("fn", [calibration_figures, fit_temperature, risk_coverage])
def test_bad_inputs_raise_one_line(fn, logits, labels, needle) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        fn(logits, labels)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_bad_n_bins(n_bins) -> None:
    with pytest.raises(ValueError, match="n_bins must be a positive integer") as err:
        calibration_figures(np.zeros((2, 3)), np.zeros(2, dtype=int), n_bins=n_bins)
    assert "\n" not in str(err.value)
