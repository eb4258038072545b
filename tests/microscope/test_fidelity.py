"""Fidelity figures against a direct NumPy/SciPy computation on the same logits and activations."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax

from microscope.fidelity import ActivationDrift, LogitFidelity

TOL = 1e-6


def numpy_reference(lf: np.ndarray, lq: np.ndarray, t: np.ndarray) -> dict[str, float]:
    lp, lqq = log_softmax(lf.astype(np.float64), axis=-1), log_softmax(lq.astype(np.float64), axis=-1)
    lp, lqq = lp.reshape(-1, lp.shape[-1]), lqq.reshape(-1, lqq.shape[-1])
    t = t.reshape(-1)
    kl = (np.exp(lp) * (lp - lqq)).sum(-1)
    rows = np.arange(len(t))
    nll_fp, nll_q = -lp[rows, t], -lqq[rows, t]
    return {
        "kl_mean": kl.mean(),
        "kl_p99": np.percentile(kl, 99),
        "top1_agreement": (lp.argmax(-1) == lqq.argmax(-1)).mean(),
        "ref_token_abs_dp_mean": np.abs(np.exp(-nll_q) - np.exp(-nll_fp)).mean(),
        "ppl_fp": np.exp(nll_fp.mean()),
        "ppl_q": np.exp(nll_q.mean()),
        "delta_ppl": np.exp(nll_q.mean()) - np.exp(nll_fp.mean()),
    }


def test_logit_fidelity_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    lf = rng.standard_normal((3, 20, 50)).astype(np.float32) * 3
    lq = lf + rng.standard_normal(lf.shape).astype(np.float32) * 0.5
    t = rng.integers(0, 50, (3, 20))
    fid = LogitFidelity()
    for b in range(3):  # accumulated over batches, as the stage does
        fid.update(torch.from_numpy(lf[b : b + 1]), torch.from_numpy(lq[b : b + 1]), torch.from_numpy(t[b : b + 1]))
    got, ref = fid.summary(), numpy_reference(lf, lq, t)
    assert set(got) == set(ref)
    for k in ref:
        assert abs(got[k] - ref[k]) <= TOL * max(1.0, abs(ref[k])), (k, got[k], ref[k])


def test_kl_of_a_model_against_itself_is_zero() -> None:
    logits = torch.randn(2, 7, 30)
    fid = LogitFidelity()
    fid.update(logits, logits.clone(), torch.randint(0, 30, (2, 7)))
    s = fid.summary()
    assert s["kl_mean"] == 0 and s["kl_p99"] == 0 and s["top1_agreement"] == 1
    assert s["ref_token_abs_dp_mean"] == 0 and s["delta_ppl"] == 0


def test_activation_drift_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 9, 16)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.1
    drift = ActivationDrift()
    drift.update("h", torch.from_numpy(a[:2]), torch.from_numpy(b[:2]))
    drift.update("h", torch.from_numpy(a[2:]), torch.from_numpy(b[2:]))
    x, y = a.reshape(-1, 16).astype(np.float64), b.reshape(-1, 16).astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    s = drift.summary()["h"]
    assert abs(s["cosine"] - cos.mean()) <= TOL
    assert abs(s["rel_error"] - np.linalg.norm(y - x) / np.linalg.norm(x)) <= TOL
    same = ActivationDrift()
    same.update("h", torch.from_numpy(a), torch.from_numpy(a))
    assert abs(same.summary()["h"]["cosine"] - 1) < 1e-12 and same.summary()["h"]["rel_error"] == 0


def test_logit_figures_are_undefined_without_logits_or_targets() -> None:
    from microscope.figures import Undefined

    none = LogitFidelity().summary()  # a model with no logits: nothing was compared
    assert set(none) >= {"kl_mean", "top1_agreement", "delta_ppl"}
    assert all(isinstance(v, Undefined) and "no output logits" in v.reason for v in none.values())
    lf = torch.randn(2, 5, 7)
    encoder = LogitFidelity()
    encoder.update(lf, lf, None)  # logits, but no next-token targets
    s = encoder.summary()
    assert s["kl_mean"] == 0 and s["top1_agreement"] == 1
    assert isinstance(s["delta_ppl"], Undefined) and "no reference token" in s["delta_ppl"].reason
