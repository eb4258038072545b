"""One model's reliability on its audit's data: calibration (with temperature scaling and selective
prediction), OOD detection per score and shifted set, and, for image classifiers, common corruptions.

The same seeded samples for the full-precision model and every variant, so their figures compare. The
samples are split once: the temperature and the Mahalanobis / k-NN statistics are fitted on the first part,
every figure that depends on a fit is measured on the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from schemas.config import ReliabilityConfig

from microscope.reliability import calibration as cal
from microscope.reliability import ood
from microscope.reliability.forward import Outputs, image_outputs, token_outputs, window_outputs
from microscope.reliability.shifted import shifted_images, shifted_windows, user_ood

NO_HEAD = "an encoder without an output head gives no class probabilities; its OOD scores use its embeddings"


def sample_split(n_total: int, rc: ReliabilityConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, evaluation indices): a seeded choice of min(samples, n) items, split once."""
    pick = np.random.default_rng([seed, 23]).permutation(n_total)[: min(rc.samples, n_total)]
    k = min(max(1, int(round(len(pick) * rc.temperature_split))), len(pick) - 1)
    if len(pick) < 2:
        raise ValueError(f"reliability needs at least 2 samples, the dataset has {n_total}; add data")
    return np.sort(pick[:k]), np.sort(pick[k:])


def knn_k(rc: ReliabilityConfig, n_fit: int) -> int:
    """The configured k, or 0.1% of the fit split (at least 1): k must stay far below a class's size."""
    return min(rc.knn_k or max(1, n_fit // 1000), n_fit)


def _calibration(fit: Outputs, test: Outputs, rc: ReliabilityConfig) -> dict[str, Any]:
    assert fit.logits is not None and test.logits is not None and fit.labels is not None and test.labels is not None
    logits = np.concatenate([fit.logits, test.logits])
    labels = np.concatenate([fit.labels, test.labels])
    return {
        "calibration": cal.calibration_figures(logits, labels, rc.n_bins),
        "temperature": cal.temperature_scaled(test.logits, test.labels, fit.logits, fit.labels, rc.n_bins),
        "risk_coverage": cal.risk_coverage(logits, labels),
    }


def _scores(
    outputs: Outputs, fit: Outputs, rc: ReliabilityConfig, window_scores: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every configured score that is defined for these outputs (higher: more in-distribution)."""
    out: dict[str, np.ndarray] = {}
    have_logits = window_scores is not None or outputs.logits is not None
    for name in rc.scores:
        if name in ("msp", "energy") and have_logits:
            if window_scores is not None:
                out[name] = window_scores[name]
            else:
                assert outputs.logits is not None
                out[name] = ood.msp(outputs.logits) if name == "msp" else ood.energy(outputs.logits)
        elif name == "mahalanobis":
            out[name] = ood.mahalanobis(fit.features, fit.labels, outputs.features)
        elif name == "knn":
            out[name] = ood.knn(fit.features, outputs.features, knn_k(rc, len(fit.features)))
    return out


def _detection(ins: dict[str, np.ndarray], outs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {s: {name: ood.detection_figures(ins[name], scores[name]) for name in ins} for s, scores in outs.items()}


def evaluate_images(
    model: Any, x: np.ndarray, y: np.ndarray, rc: ReliabilityConfig, seed: int, ood_path: str | None = None
) -> dict[str, Any]:
    """Calibration, OOD and corruption figures of an image classifier on its audit's images."""
    fit_i, test_i = sample_split(len(x), rc, seed)
    fit = image_outputs(model, x[fit_i], y[fit_i], rc.batch_size)
    test = image_outputs(model, x[test_i], y[test_i], rc.batch_size)
    sets = user_ood(ood_path, "images", x, None) if ood_path else shifted_images(x[test_i], seed)
    ins = _scores(test, fit, rc)
    outs = {
        name: _scores(image_outputs(model, xs, np.zeros(len(xs)), rc.batch_size), fit, rc) for name, xs in sets.items()
    }
    return {
        "n": len(fit_i) + len(test_i),
        "n_fit": len(fit_i),
        "n_eval": len(test_i),
        **_calibration(fit, test, rc),
        "ood": _detection(ins, outs),
        "ood_sets": {name: len(xs) for name, xs in sets.items()},
        "knn_k": knn_k(rc, len(fit_i)),
        "corruptions": corruption_accuracies(model, x[test_i], y[test_i], rc, seed),
        "smoothing": certificates(model, x[test_i], y[test_i], rc, seed),
        "sample_indices": {"fit": fit_i.tolist(), "eval": test_i.tolist()},  # results.json only: reproducible
    }


def certificates(model: Any, x: np.ndarray, y: np.ndarray, rc: ReliabilityConfig, seed: int) -> dict[str, Any] | None:
    """Randomized-smoothing certificates per σ on the first `smoothing.samples` evaluation images (None: off)."""
    from microscope.reliability.smoothing import certify

    sc = rc.smoothing
    if not sc.sigmas:
        return None
    x, y = x[: sc.samples], y[: sc.samples]
    out = {}
    for sigma in sc.sigmas:
        c = certify(model, x, y, sigma, sc.n0, sc.n, sc.alpha, rc.batch_size, seed)
        c["certified_accuracy"] = {f"{r:g}": a for r, a in c["certified_accuracy"].items()}  # JSON keys
        out[f"{sigma:g}"] = c
    return out


def corruption_accuracies(model: Any, x: np.ndarray, y: np.ndarray, rc: ReliabilityConfig, seed: int) -> dict[str, Any]:
    """Accuracy per corruption and severity on the first `corruption_samples` evaluation images."""
    from microscope.reliability.corruptions import ALL, corrupt

    x, y = x[: rc.corruption_samples], y[: rc.corruption_samples]
    clean = float((image_outputs(model, x, y, rc.batch_size).logits.argmax(1) == y).mean())  # type: ignore[union-attr]
    acc: dict[str, dict[str, float]] = {}
    for name in rc.corruptions or ALL:
        acc[name] = {}
        for sev in rc.severities:
            logits = image_outputs(model, corrupt(x, name, sev, seed), y, rc.batch_size).logits
            acc[name][str(sev)] = float((logits.argmax(1) == y).mean())  # type: ignore[union-attr]
    return {"n": len(x), "clean_accuracy": clean, "accuracy": acc}


def evaluate_text(
    model: Any,
    windows: np.ndarray,
    rc: ReliabilityConfig,
    seed: int,
    causal: bool,
    tokenizer: Any | None,
    ood_path: str | None = None,
) -> dict[str, Any]:
    """A text model: next-token calibration (causal LMs) on seeded positions, and window-level OOD detection."""
    fit_i, test_i = sample_split(len(windows), rc, seed)
    results: dict[str, Any] = {"n_windows_fit": len(fit_i), "n_windows_eval": len(test_i)}
    results["sample_indices"] = {"fit": fit_i.tolist(), "eval": test_i.tolist()}  # windows; results.json only
    if causal:
        fit = token_outputs(model, windows[fit_i], max(2, int(rc.samples * rc.temperature_split)), rc.batch_size, seed)
        test = token_outputs(model, windows[test_i], max(2, rc.samples - len(fit.features)), rc.batch_size, seed + 1)
        results |= {"n": len(fit.features) + len(test.features), "n_fit": len(fit.features)}
        results |= {"n_eval": len(test.features), **_calibration(fit, test, rc)}
    else:
        results |= {"n": len(fit_i) + len(test_i), "calibration": None, "calibration_undefined": NO_HEAD}
    sets = (
        user_ood(ood_path, "text", windows, tokenizer)
        if ood_path
        else shifted_windows(windows[test_i], seed, tokenizer)
    )
    fit_scores, fit_feats = window_outputs(model, windows[fit_i], rc.batch_size, causal)
    in_scores, in_feats = window_outputs(model, windows[test_i], rc.batch_size, causal)
    fit_w = Outputs(None, fit_feats, None)
    ins = _scores(Outputs(None, in_feats, None), fit_w, rc, in_scores if causal else None)
    outs = {}
    for name, ws in sets.items():
        scores, feats = window_outputs(model, ws, rc.batch_size, causal)
        outs[name] = _scores(Outputs(None, feats, None), fit_w, rc, scores if causal else None)
    results |= {"ood": _detection(ins, outs), "ood_sets": {name: len(ws) for name, ws in sets.items()}}
    results["knn_k"] = knn_k(rc, len(fit_feats))
    return results
