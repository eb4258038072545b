"""Evaluation against closed cases: an identity "SAE" recovers all CE, a zero one none."""

from __future__ import annotations

import numpy as np
import torch

from microscope.sae.evaluate import downstream, reconstruction
from tests.conftest import build_model


def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, (6, 16)).astype(np.int32)


def test_ce_recovered_identity_is_one_and_zero_is_zero() -> None:
    model = build_model("gpt2")
    path = "transformer.h.1"
    ident = downstream(model, path, lambda t: t, ids(), 3, causal=True)
    assert abs(ident["ce_recovered"] - 1.0) < 1e-9 and abs(ident["kl_clean_spliced"]) < 1e-9
    assert abs(ident["ce_spliced"] - ident["ce_clean"]) < 1e-9
    zero = downstream(model, path, torch.zeros_like, ids(), 3, causal=True)
    assert abs(zero["ce_recovered"]) < 1e-9 and zero["ce_zero_ablated"] == zero["ce_spliced"]
    # The clean CE is the model's own next-token loss.
    x = torch.from_numpy(ids().astype(np.int64))
    with torch.no_grad():
        ref = model(input_ids=x, labels=x).loss.item()
    assert abs(ident["ce_clean"] - ref) < 1e-5


def test_encoder_embedding_cosine() -> None:
    model = build_model("bert")
    assert abs(downstream(model, "encoder.layer.1", lambda t: t, ids(), 3, causal=False)["embedding_cosine"] - 1) < 1e-9
    noisy = downstream(model, "encoder.layer.1", lambda t: t + torch.randn_like(t), ids(), 3, causal=False)
    assert noisy["embedding_cosine"] < 0.9999


def test_reconstruction_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    w = torch.from_numpy(rng.standard_normal((8, 20)).astype(np.float32))

    def encode(t):
        return torch.relu(t @ w - 1.0)

    def decode(a):
        return a @ w.T * 0.1

    got = reconstruction(encode, decode, [x[:100], x[100:]], 20)
    a = np.maximum(x.astype(np.float64) @ w.double().numpy() - 1.0, 0)
    r = a @ w.double().numpy().T * 0.1
    assert abs(got["mse"] - ((r - x) ** 2).sum(1).mean()) < 1e-4
    assert abs(got["fvu"] - ((r - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()) < 1e-6
    assert abs(got["l0"] - (a > 0).sum(1).mean()) < 1e-9
    dens = (a > 0).mean(0)
    assert abs(got["dead_frac"] - (dens == 0).mean()) < 1e-12 and abs(got["dense_frac"] - (dens > 0.1).mean()) < 1e-12
    assert sum(got["density_hist"]["counts"]) + got["density_hist"]["never_fired"] == 20
