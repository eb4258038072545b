"""Classifier calibration from logits: binned calibration errors, proper scores, temperature scaling,
and the selective-prediction risk–coverage curve.

Everything is computed from the logits in float64, with the softmax taken through log-sum-exp, never
from stored (rounded) probabilities: a rounded confidence can cross a bin edge, and log(p) of a rounded
p loses the tail that NLL is most sensitive to.

Binning rule (equal-width): bin i of n covers (i/n, (i+1)/n], the first bin is closed, [0, 1/n], so a
confidence of exactly 1.0 lands in the last bin. (torchmetrics buckets right-open and sends 1.0 to an
extra, phantom bin — Lightning-AI/torchmetrics issue 3510; we do not.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (float64 logits [n, C], int64 labels [n]); every problem is one line naming the fix."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be 2-D [n_samples, n_classes] with n_classes >= 2, got shape {logits.shape}")
    if not (np.issubdtype(logits.dtype, np.floating) or np.issubdtype(logits.dtype, np.integer)):
        raise ValueError(f"logits must be numeric, got dtype {logits.dtype}; pass raw model outputs as floats")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D class indices, got shape {labels.shape}; flatten them or argmax one-hots")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}; cast with .astype(int)")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits has {logits.shape[0]} rows but labels has {labels.shape[0]}; pass matching samples")
    if labels.shape[0] < 1:
        raise ValueError("no samples: logits and labels are empty; pass at least one sample")
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():
        bad = int((~np.isfinite(z)).any(axis=1).sum())
        raise ValueError(f"logits contain NaN or inf in {bad} rows; drop or fix those rows before calibration")
    n_classes = z.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes, got range "
            f"[{labels.min()}, {labels.max()}]; remap them to 0..n_classes-1"
        )
    return z, labels.astype(np.int64)


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}; use e.g. 15")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax by log-sum-exp (shifted by the row max, so no overflow)."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each value under the (lower, upper] rule, first bin [0, 1/n], 1.0 in the last."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(left) gives i with edges[i-1] < v <= edges[i]; v == 0 gives 0, clipped into bin 0.
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def _binned(values: np.ndarray, outcomes: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean value, mean outcome) per equal-width bin; means are NaN where a bin is empty."""
    idx = _bin_index(values, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_value = np.bincount(idx, weights=values, minlength=n_bins) / count
        mean_outcome = np.bincount(idx, weights=outcomes, minlength=n_bins) / count
    return count, mean_value, mean_outcome


def _l1_binned_error(values: np.ndarray, outcomes: np.ndarray, n_bins: int) -> float:
    count, mean_value, mean_outcome = _binned(values, outcomes, n_bins)
    full = count > 0
    return float(np.sum(count[full] * np.abs(mean_outcome[full] - mean_value[full])) / values.shape[0])


def _ace(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Top-label L1 error over equal-mass bins: the confidences sorted (stable) and split into n_bins
    groups whose sizes differ by at most one (np.array_split); with n < n_bins, the empty groups drop out."""
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for group in np.array_split(order, n_bins):
        if group.size:
            total += group.size * abs(correct[group].mean() - confidence[group].mean())
    return float(total / confidence.shape[0])


def calibration_figures(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Calibration of a classifier's softmax(logits) against integer labels, as JSON-ready numbers.

    Top-label figures use the max-probability confidence and whether its argmax is right: ``ece`` (L1,
    count-weighted), ``mce`` (max over non-empty bins), ``rms_ce`` (sqrt of the count-weighted mean squared
    gap), all on equal-width bins; ``ace`` is the L1 error on equal-mass bins. ``classwise_ece`` averages,
    over all classes, the equal-width L1 error of each class's probability against its indicator (Kull et
    al. 2019). ``nll`` and ``brier`` (sum over classes of squared error, mean over samples) are proper
    scores and need no bins. ``diagram`` holds the reliability-diagram columns, None where a bin is empty.
    """
    z, y = _inputs(logits, labels)
    _check_n_bins(n_bins)
    n, n_classes = z.shape
    log_p = _log_softmax(z)
    p = np.exp(log_p)
    pred = log_p.argmax(axis=1)
    confidence = p[np.arange(n), pred]
    correct = (pred == y).astype(np.float64)

    count, mean_conf, mean_acc = _binned(confidence, correct, n_bins)
    full = count > 0
    gap = np.abs(mean_acc[full] - mean_conf[full])
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    classwise = [_l1_binned_error(p[:, k], onehot[:, k], n_bins) for k in range(n_classes)]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "n": int(n),
        "n_bins": int(n_bins),
        "binning": f"top-label, {n_bins} equal-width bins (lower, upper] with the first [0, 1/{n_bins}] and 1.0 "
        "in the last, L1 (ECE) / max (MCE) / L2 (RMS); ACE on equal-mass bins, L1",
        "accuracy": float(correct.mean()),
        "ece": float(np.sum(count[full] * gap) / n),
        "ace": _ace(confidence, correct, n_bins),
        "mce": float(gap.max()),
        "rms_ce": float(np.sqrt(np.sum(count[full] * gap**2) / n)),
        "nll": float(-log_p[np.arange(n), y].mean()),
        "brier": float(np.sum((p - onehot) ** 2, axis=1).mean()),
        "classwise_ece": float(np.mean(classwise)),
        "diagram": {
            "bin_lower": edges[:-1].tolist(),
            "bin_upper": edges[1:].tolist(),
            "accuracy": [float(a) if c else None for a, c in zip(mean_acc, count, strict=True)],
            "confidence": [float(m) if c else None for m, c in zip(mean_conf, count, strict=True)],
            "count": [int(c) for c in count],
        },
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The single temperature T > 0 minimising the mean NLL of softmax(logits / T) (Guo et al. 2017).

    A bounded 1-D search on log T (the NLL is smooth and unimodal in practice there, and the scale is
    multiplicative); xatol = 1e-5 on log T is a relative error of 1e-5 on T, well inside 3 significant
    digits. Dividing by T > 0 keeps every row's argmax, so accuracy is unchanged by construction. A result
    at either bound means the optimum lies outside them: widen ``bounds`` rather than trust it.
    """
    from scipy.optimize import minimize_scalar

    z, y = _inputs(logits, labels)
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (0 < lo < hi and np.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}; use e.g. (0.05, 20.0)")
    rows = np.arange(z.shape[0])

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def temperature_scaled(
    logits: np.ndarray,
    labels: np.ndarray,
    fit_logits: np.ndarray,
    fit_labels: np.ndarray,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Fit T on (fit_logits, fit_labels), then report calibration of the evaluation split before and after
    dividing its logits by T. Fit and evaluation should be disjoint, or the "after" figures are optimistic."""
    t = fit_temperature(fit_logits, fit_labels)
    z, y = _inputs(logits, labels)
    if np.asarray(fit_logits).shape[1] != z.shape[1]:
        raise ValueError(
            f"fit_logits has {np.asarray(fit_logits).shape[1]} classes but logits has {z.shape[1]}; "
            "fit and evaluate on the same label space"
        )
    return {
        "temperature": t,
        "before": calibration_figures(z, y, n_bins),
        "after": calibration_figures(z / t, y, n_bins),
    }


def risk_coverage(logits: np.ndarray, labels: np.ndarray, points: int = 101) -> dict[str, Any]:
    """Selective-prediction risk–coverage curve and its area (AURC; Geifman et al. 2019).

    Samples are ordered by max-softmax confidence, descending, with a stable sort on -confidence: tied
    samples keep their input order. At coverage k/n the risk is the error rate among the first k; ``aurc``
    is the mean of the risk over all n coverages. ``coverage`` and ``risk`` are subsampled to at most
    ``points`` evenly spaced coverages (always including 1/n and 1) for storage; ``aurc`` uses them all.
    """
    z, y = _inputs(logits, labels)
    if isinstance(points, bool) or not isinstance(points, int | np.integer) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}; use e.g. 101")
    n = z.shape[0]
    log_p = _log_softmax(z)
    pred = log_p.argmax(axis=1)
    order = np.argsort(-log_p.max(axis=1), kind="stable")  # log p is monotone in p and keeps more resolution
    errors = (pred != y)[order].astype(np.float64)
    k = np.arange(1, n + 1)
    risk = np.cumsum(errors) / k
    keep = np.unique(np.round(np.linspace(0, n - 1, min(points, n))).astype(np.int64))
    return {
        "n": int(n),
        "aurc": float(risk.mean()),
        "error_rate": float(risk[-1]),
        "ordering": "max-softmax confidence descending, stable sort: ties keep input order",
        "coverage": (k[keep] / n).tolist(),
        "risk": risk[keep].tolist(),
    }
