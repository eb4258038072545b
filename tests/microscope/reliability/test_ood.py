"""OOD scores and detection figures against independent references (closed forms, sklearn, scipy, NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.special import logsumexp, softmax
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from microscope.reliability.ood import detection_figures, energy, knn, mahalanobis, msp

Z95 = float(norm.ppf(0.95))


@pytest.mark.parametrize(("d", "sigma_out"), [(1.5, 1.0), (3.0, 1.0), (1.5, 2.0)])
def test_gaussian_figures_match_closed_forms(d: float, sigma_out: float) -> None:
    """ID ~ N(d, 1), OOD ~ N(0, σ²), 200,000 each; tolerances ±0.003 (AUROC) and ±0.005 (FPR95), ~3 s.e.

    AUROC = P(ID > OOD) = Φ(d / √(1 + σ²)), which is Φ(d/√2) for σ = 1.
    ID positive: the threshold keeping 95% of ID solves P(ID ≥ t) = 0.95, t = d − z95; the OOD accepted
    are P(OOD ≥ t) = 1 − Φ((d − z95)/σ), i.e. 1 − Φ(d − z95) for σ = 1.
    OOD positive: flagged OOD when score ≤ t with P(OOD ≤ t) = 0.95, t = σ·z95; the ID flagged are
    P(ID ≤ t) = Φ(σ·z95 − d), i.e. Φ(z95 − d) for σ = 1 (equal to the ID-positive value only when σ = 1,
    hence the σ = 2 case that tells the conventions apart).
    """
    rng = np.random.default_rng(20240601)
    s_in = rng.normal(d, 1.0, 200_000)
    s_out = rng.normal(0.0, sigma_out, 200_000)
    fig = detection_figures(s_in, s_out)

    assert abs(fig["auroc"] - norm.cdf(d / np.sqrt(1 + sigma_out**2))) < 0.003
    assert abs(fig["fpr95_id_positive"] - (1 - norm.cdf((d - Z95) / sigma_out))) < 0.005
    assert abs(fig["fpr95_ood_positive"] - norm.cdf(sigma_out * Z95 - d)) < 0.005

    is_id = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    scores = np.r_[s_in, s_out]
    assert fig["auroc"] == pytest.approx(roc_auc_score(is_id, scores), abs=1e-12)
    assert fig["aupr_in"] == pytest.approx(average_precision_score(is_id, scores), abs=1e-12)
    assert fig["aupr_out"] == pytest.approx(average_precision_score(1 - is_id, -scores), abs=1e-12)
    assert (fig["n_in"], fig["n_out"]) == (200_000, 200_000)


def _openood_fpr95(pos: np.ndarray, neg: np.ndarray) -> float:
    """OpenOOD's recipe: the ROC's FPR at the first point whose TPR reaches 95%."""
    fpr, tpr, _ = roc_curve(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def test_fpr95_equals_roc_curve_reading_with_ties() -> None:
    """Exact agreement with sklearn's ROC on rounded (heavily tied) scores, for both conventions."""
    rng = np.random.default_rng(7)
    s_in = np.round(rng.normal(1.0, 1.0, 997), 1)
    s_out = np.round(rng.normal(0.0, 1.5, 1503), 1)
    fig = detection_figures(s_in, s_out)
    assert fig["fpr95_id_positive"] == _openood_fpr95(s_in, s_out)
    assert fig["fpr95_ood_positive"] == _openood_fpr95(-s_out, -s_in)


def test_fpr95_by_hand() -> None:
    # 20 ID scores 1..20: keeping 19 of them (95%) puts t at 2, so OOD ≥ 2 are accepted: {2, 3} of 4.
    # OOD positive on −score: 20 OOD scores −20..−1 need 19 flagged, score ≤ −2; ID ≤ −2: {−5} of 3 (ties at t flagged).
    fig = detection_figures(np.arange(1.0, 21.0), np.array([0.0, 1.5, 2.0, 3.0]))
    assert fig["fpr95_id_positive"] == 0.5
    fig = detection_figures(np.array([-5.0, -1.5, 4.0]), -np.arange(1.0, 21.0))
    assert fig["fpr95_ood_positive"] == pytest.approx(1 / 3)


def test_roc_subsampled_and_conventions_listed() -> None:
    rng = np.random.default_rng(0)
    fig = detection_figures(rng.normal(1, 1, 5000), rng.normal(0, 1, 5000), points=11)
    roc = fig["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) <= 11
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert set(fig["conventions"]) >= {"auroc", "aupr_in", "aupr_out", "fpr95_id_positive", "fpr95_ood_positive"}
    assert all(isinstance(fig[key], float) for key in ("auroc", "aupr_in", "aupr_out", "fpr95_id_positive"))


def _reference_mahalanobis(train: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    classes = np.unique(labels)
    means = {c: train[labels == c].mean(0) for c in classes}
    cov = sum((train[labels == c] - means[c]).T @ (train[labels == c] - means[c]) for c in classes) / len(train)
    precision = np.linalg.pinv(cov)
    dists = np.stack([np.array([(x - means[c]) @ precision @ (x - means[c]) for x in query]) for c in classes])
    return -dists.min(0)


def _three_classes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(0, 3, (3, 5))
    labels = np.repeat([0, 1, 2], 200)
    mix = rng.normal(0, 1, (5, 5))
    return centres[labels] + rng.normal(0, 1, (600, 5)) @ mix, labels


def test_mahalanobis_matches_numpy_reference() -> None:
    """Three Gaussian classes, d = 5, n = 600; rtol 1e-5 against a per-sample pinv loop."""
    rng = np.random.default_rng(3)
    train, labels = _three_classes(rng)
    query = rng.normal(0, 4, (50, 5))
    np.testing.assert_allclose(
        mahalanobis(train, labels, query), _reference_mahalanobis(train, labels, query), rtol=1e-5
    )
    # eps = 0⁺ shrinkage is the plain inverse of a well-conditioned Σ.
    np.testing.assert_allclose(
        mahalanobis(train, labels, query, eps=1e-12), mahalanobis(train, labels, query), rtol=1e-6
    )


def test_mahalanobis_singular_and_single_class() -> None:
    rng = np.random.default_rng(4)
    train, labels = _three_classes(rng)
    train[:, 2] = 0.7  # a constant feature: Σ is singular
    query = rng.normal(0, 4, (50, 5))
    scores = mahalanobis(train, labels, query)
    assert np.isfinite(scores).all() and (scores <= 0).all()
    assert np.isfinite(mahalanobis(train, labels, query, eps=1e-3)).all()

    single = mahalanobis(train, None, query)
    np.testing.assert_allclose(single, _reference_mahalanobis(train, np.zeros(600), query), rtol=1e-5)
    np.testing.assert_allclose(mahalanobis(train, np.zeros(600), query), single, rtol=1e-12)


def _reference_knn(train: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    return -np.sort(cdist(q, t), axis=1)[:, k - 1]


def test_knn_matches_cdist_and_chunking_is_invisible() -> None:
    """Brute-force cdist reference, absolute tolerance 1e-10; includes queries that are training rows."""
    rng = np.random.default_rng(5)
    train = rng.normal(0, 1, (300, 16))
    query = np.vstack([rng.normal(0, 1, (97, 16)), train[:20]])
    for k in (1, 5, 50):
        expected = _reference_knn(train, query, k)
        np.testing.assert_allclose(knn(train, query, k), expected, rtol=0, atol=1e-10)
        for chunk in (1, 7, 1000):
            np.testing.assert_array_equal(knn(train, query, k, chunk_size=chunk), knn(train, query, k))
    # A training row is its own nearest neighbour: distance 0 exactly, nothing excluded.
    np.testing.assert_allclose(knn(train, train[:20], 1), 0.0, atol=1e-12)


def test_knn_clips_k_to_train_size() -> None:
    rng = np.random.default_rng(6)
    train, query = rng.normal(0, 1, (10, 4)), rng.normal(0, 1, (5, 4))
    with pytest.warns(UserWarning, match="using k=10"):
        scores = knn(train, query, k=50)
    np.testing.assert_array_equal(scores, knn(train, query, k=10))


def test_msp_and_energy_match_scipy_including_huge_logits() -> None:
    """Against scipy softmax / logsumexp: MSP to atol 1e-12, energy to rtol 1e-12 (it is ~1e4 in size)."""
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 3, (200, 10))
    logits[:5] = [[1e4, -1e4, 0, 1e4 - 1, 5, -3, 2, 1, 0, 0]] * 5
    logits[5:10] *= 3000.0
    logits[10] = -1e4
    np.testing.assert_allclose(msp(logits), softmax(logits, axis=1).max(1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(energy(logits), logsumexp(logits, axis=1), rtol=1e-12)
    np.testing.assert_allclose(energy(logits, temperature=2.5), 2.5 * logsumexp(logits / 2.5, axis=1), rtol=1e-12)
    assert np.isfinite(msp(logits)).all() and np.isfinite(energy(logits)).all()
    assert msp(logits[0]).shape == (1,)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: detection_figures(np.array([]), np.ones(3)), "score_in is empty"),
        (lambda: detection_figures(np.ones(3), np.array([1.0, np.nan])), "score_out has 1 non-finite"),
        (lambda: detection_figures(np.ones((3, 2)), np.ones(3)), "score_in must be 1-D"),
        (lambda: detection_figures(np.ones(3), np.ones(3), points=1), "points must be"),
        (lambda: msp(np.array([[1.0, np.inf]])), "logits has 1 non-finite"),
        (lambda: energy(np.ones((2, 3)), temperature=0.0), "temperature"),
        (lambda: mahalanobis(np.ones((4, 3)), np.zeros(3), np.ones((2, 3))), "train_labels has shape"),
        (lambda: mahalanobis(np.ones((4, 3)), None, np.ones((2, 2))), "dimensions"),
        (lambda: mahalanobis(np.ones((4, 3)), None, np.ones((2, 3)), eps=-1.0), "eps"),
        (lambda: knn(np.ones((4, 3)), np.ones((2, 3)), k=0), "k must be"),
        (lambda: knn(np.ones((4, 3)), np.ones(3)), "features must be 2-D"),
    ],
)
def test_bad_inputs_raise_one_line(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
