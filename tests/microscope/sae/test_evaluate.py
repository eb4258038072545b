"""Evaluation against closed cases: an identity "SAE" recovers all CE, a zero one none; CE recovered is
undefined, with its reason, where the model does not use the layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microscope.figures import Undefined
from microscope.sae.evaluate import ce_recovered, downstream, reconstruction
from tests.conftest import build_model


def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, (6, 16)).astype(np.int32)


def model_that_uses_its_layers() -> tuple[torch.nn.Module, np.ndarray]:
    """The tiny GPT-2 with sharpened logits, fed its own greedy continuations: its clean CE is far below
    the zero-ablation CE (uniform logits, ln 512), so recovery is defined."""
    model = build_model("gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(50)
        x = torch.from_numpy(ids()[:, :1].astype(np.int64))
        for _ in range(15):
            x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], 1)
    return model, x.numpy().astype(np.int32)


def test_ce_recovered_identity_is_one_and_zero_is_zero() -> None:
    model, tokens = model_that_uses_its_layers()
    path = "transformer.h.1"
    ident = downstream(model, path, lambda t: t, tokens, 3, causal=True)
    assert ident["ce_zero_ablated"] - ident["ce_clean"] > 1  # the layer matters
    assert abs(ident["ce_recovered"] - 1.0) < 1e-9 and abs(ident["kl_clean_spliced"]) < 1e-9
    assert abs(ident["ce_spliced"] - ident["ce_clean"]) < 1e-9
    zero = downstream(model, path, torch.zeros_like, tokens, 3, causal=True)
    assert abs(zero["ce_recovered"]) < 1e-9 and zero["ce_zero_ablated"] == zero["ce_spliced"]
    # The clean CE is the model's own next-token loss.
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        ref = model(input_ids=x, labels=x).loss.item()
    assert abs(ident["ce_clean"] - ref) < 1e-5


def test_ce_recovered_of_a_random_model_is_undefined_with_its_reason() -> None:
    """A random tiny LM predicts no better than uniform logits: zero-ablating a layer does not raise its
    CE, so 'recovered' has nothing to be a share of (it used to come out as ratios like 1.45)."""
    model = build_model("gpt2")
    out = downstream(model, "transformer.h.1", lambda t: t + 0.1 * torch.randn_like(t), ids(), 3, causal=True)
    got = out["ce_recovered"]
    assert isinstance(got, Undefined)
    assert out["ce_clean"] >= out["ce_zero_ablated"]  # the reason's premise, on this model
    assert got.reason.startswith(
        f"clean CE {out['ce_clean']:.4g} is not below zero-ablation CE {out['ce_zero_ablated']:.4g}"
    )
    assert "does not use this layer" in got.reason
    assert all(isinstance(out[k], float) for k in ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_clean_spliced"))


@pytest.mark.parametrize(
    ("clean", "spliced", "zero", "se", "want"),
    [
        (2.0, 3.0, 6.0, 0.1, 0.75),  # (6 − 3) / (6 − 2)
        (2.0, 7.0, 6.0, 0.1, -0.25),  # worse than ablating: negative, and still defined
        (6.0, 6.0, 6.0, 0.0, "not below"),  # zero gap
        (6.3, 6.2, 6.25, 0.01, "not below"),  # ablation helps
        (6.25, 6.24, 6.26, 0.02, "denominator is noise"),  # a gap within two standard errors
    ],
)
def test_ce_recovered_closed_cases(clean: float, spliced: float, zero: float, se: float, want: float | str) -> None:
    got = ce_recovered(clean, spliced, zero, se)
    if isinstance(want, str):
        assert isinstance(got, Undefined) and want in got.reason
    else:
        assert got == pytest.approx(want, abs=1e-12)


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
