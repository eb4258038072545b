"""Out-of-distribution scores and detection figures.

Convention throughout: a score is higher for inputs that look in-distribution (ID). Scores: maximum softmax
probability (Hendrycks & Gimpel 2017), negative energy (Liu et al. 2020), Mahalanobis distance to class means
under a tied covariance (Lee et al. 2018), and the distance to the k-th nearest normalised training feature
(Sun et al. 2022). All return float64 arrays; `detection_figures` turns an ID and an OOD score sample into
AUROC, AUPR and FPR@95%TPR under both conventions found in the literature.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

# Eigenvalues of the tied covariance below this fraction of the largest are rank-deficiency noise (a constant
# feature, fewer samples than features); inverting them would let one null direction dominate every distance.
_PINV_RTOL = 1e-10
# kNN works on blocks of queries so the query × train distance block (and its argpartition) stays this small.
_KNN_BLOCK_BYTES = 48 * 2**20


def _finite_array(x: Any, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}; reshape it to {ndim}-D before the call")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); pass at least one sample")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN/inf); drop or repair those samples first")
    return a


def _logits(logits: Any) -> np.ndarray:
    a = np.asarray(logits, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    return _finite_array(a, "logits", 2)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, shifted by the row maximum so ±1e4 logits neither overflow nor underflow."""
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1))


def msp(logits: Any) -> np.ndarray:
    """Maximum softmax probability per row of `logits` [n, classes] (a 1-D vector is one sample)."""
    x = _logits(logits)
    # max softmax = exp(max - lse) = 1 / sum(exp(x - max)): the sum is ≥ 1, so this never overflows.
    return 1.0 / np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)


def energy(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T·logsumexp(logits / T) per row (Liu et al. 2020); higher = more ID."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}; use 1.0 for the paper")
    return temperature * _logsumexp(_logits(logits) / temperature)


def mahalanobis(train_features: Any, train_labels: Any | None, features: Any, eps: float | None = None) -> np.ndarray:
    """Negative minimum squared Mahalanobis distance to the class means (Lee et al. 2018).

    One tied covariance Σ = (1/N) Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ is shared by all classes. With `eps=None`
    its inverse is the pseudo-inverse (np.linalg.pinv, hermitian=True, eigenvalues below 1e-10·λ_max dropped):
    this is the ordinary inverse when Σ is well-conditioned and ignores null directions when it is singular or
    ill-conditioned (a constant feature, fewer samples than features). With `eps` given, Σ + eps·I is inverted
    instead (shrinkage; eps > 0). `train_labels=None` treats all training features as one class, e.g. a
    language model's embeddings: the score is then the distance to the single mean.
    """
    train = _finite_array(train_features, "train_features", 2)
    query = _finite_array(features, "features", 2)
    if query.shape[1] != train.shape[1]:
        raise ValueError(
            f"features have {query.shape[1]} dimensions but train_features {train.shape[1]}; use the same layer"
        )
    if train_labels is None:
        labels = np.zeros(train.shape[0], dtype=np.int64)
    else:
        labels = np.asarray(train_labels)
        if labels.shape != (train.shape[0],):
            raise ValueError(
                f"train_labels has shape {labels.shape}, expected ({train.shape[0]},); one label per training row"
            )
    classes, inverse = np.unique(labels, return_inverse=True)
    means = np.stack([train[inverse == c].mean(axis=0) for c in range(len(classes))])
    centred = train - means[inverse]
    cov = centred.T @ centred / train.shape[0]
    if eps is None:
        precision = np.linalg.pinv(cov, hermitian=True, rtol=_PINV_RTOL)
    else:
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite positive number, got {eps!r}; or pass eps=None for pinv")
        precision = np.linalg.inv(cov + eps * np.eye(cov.shape[0]))
    best = np.full(query.shape[0], np.inf)
    for mean in means:
        diff = query - mean
        np.minimum(best, np.einsum("ij,ij->i", diff @ precision, diff), out=best)
    # A PSD quadratic form is ≥ 0; rounding can leave −1e-16.
    return -np.maximum(best, 0.0)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector stays zero rather than becoming NaN.
    return x / np.where(norms > 0, norms, 1.0)


def knn(train_features: Any, features: Any, k: int = 50, *, chunk_size: int | None = None) -> np.ndarray:
    """Negative distance to the k-th nearest L2-normalised training feature (Sun et al. 2022).

    Nothing is excluded: a query that is itself a training row counts as its own nearest neighbour. `k` larger
    than the training set is clipped to n_train with a warning. The neighbours are found by scikit-learn's
    brute-force search, its distance blocks kept under ~48 MB; `chunk_size` (default: all) splits the queries
    further. The chosen neighbour's distance is then recomputed directly (exact near zero)."""
    train = _normalise(_finite_array(train_features, "train_features", 2))
    query = _normalise(_finite_array(features, "features", 2))
    if query.shape[1] != train.shape[1]:
        raise ValueError(
            f"features have {query.shape[1]} dimensions but train_features {train.shape[1]}; use the same layer"
        )
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}; the paper uses k=50 (1000 for ImageNet)")
    n_train = train.shape[0]
    if k > n_train:
        warnings.warn(f"knn: k={k} exceeds the {n_train} training features; using k={n_train}", stacklevel=2)
        k = n_train
    if chunk_size is None:
        chunk_size = query.shape[0] or 1  # scikit-learn bounds each block's memory itself (working_memory below)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}; or leave it None for the memory-bounded default")
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    # scikit-learn's brute-force search (a parallel GEMM + k-selection, 3× faster than NumPy's argpartition)
    index = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train)
    scores = np.empty(query.shape[0])
    for start in range(0, query.shape[0], chunk_size):
        block = query[start : start + chunk_size]
        with sklearn.config_context(working_memory=_KNN_BLOCK_BYTES // 2**20):  # MiB per distance block
            kth = index.kneighbors(block, return_distance=False)[:, k - 1]
        # The expanded form loses ~1e-8 near zero distance; recompute the chosen neighbour's distance directly.
        scores[start : start + chunk_size] = -np.linalg.norm(block - train[kth], axis=1)
    return scores


def _fpr_at_95(positive: np.ndarray, negative: np.ndarray) -> float:
    """Fraction of negatives with score ≥ t, t the largest threshold keeping ≥ 95% of positives (score ≥ t)."""
    kept = -(-95 * positive.size // 100)  # ceil(0.95·n) in integers, free of 0.95's rounding
    threshold = np.sort(positive)[::-1][kept - 1]
    return float(np.mean(negative >= threshold))


def detection_figures(score_in: np.ndarray, score_out: np.ndarray, points: int = 101) -> dict[str, Any]:
    """AUROC, AUPR-In/Out, FPR@95%TPR (both conventions) and a subsampled ROC curve, as plain Python values.

    Thresholds come exactly from the sorted scores: a threshold t accepts (calls positive) scores ≥ t, so tied
    samples fall on the same side, and the threshold is the largest one reaching 95% TPR (TPR may exceed 95%
    with ties). With OOD as positive the detector score is −score, i.e. a sample is flagged OOD when score ≤ t.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in = _finite_array(score_in, "score_in", 1)
    s_out = _finite_array(score_out, "score_out", 1)
    if isinstance(points, bool) or not isinstance(points, int | np.integer) or points < 2:
        raise ValueError(f"points must be an integer ≥ 2, got {points!r}; the ROC needs both ends")
    is_id = np.concatenate([np.ones(s_in.size, dtype=np.int64), np.zeros(s_out.size, dtype=np.int64)])
    scores = np.concatenate([s_in, s_out])
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    keep = np.unique(np.linspace(0, fpr.size - 1, min(points, fpr.size)).round().astype(np.int64))
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
        "fpr95_id_positive": _fpr_at_95(s_in, s_out),
        "fpr95_ood_positive": _fpr_at_95(-s_out, -s_in),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
        "conventions": {
            "auroc": "Area under the ROC with ID as the positive class; 0.5 is chance, 1 separates perfectly.",
            "aupr_in": "Average precision with ID as positive and the score as is (sklearn average_precision_score).",
            "aupr_out": "Average precision with OOD as positive and the score negated.",
            "fpr95_id_positive": "Fraction of OOD accepted as ID at the threshold that keeps 95% of ID (Liu et al. 2020).",
            "fpr95_ood_positive": "Fraction of ID flagged as OOD at the threshold that detects 95% of OOD (OpenOOD v1.5).",
            "roc": f"ROC with ID positive, at most {points} points subsampled from sklearn roc_curve, ends kept.",
        },
        "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
    }
