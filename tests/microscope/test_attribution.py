"""microscope.attribution against independent references: closed-form IG of a linear model, completeness
of a ReLU CNN, direct Captum calls, and Adebayo et al.'s randomisation test on a trained digits CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from microscope import attribution as attr


def _linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False)).eval()


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    ).eval()


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_ig_of_a_linear_model_is_weight_times_input() -> None:
    model, x, t = _linear(), _images(), torch.tensor([0, 1, 2, 1])
    out = attr.integrated_gradients(model, x, t, steps=8)
    w = model[1].weight.detach()[t].reshape(x.shape)
    np.testing.assert_allclose(out["attributions"], (w * x).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["delta"], 0.0, atol=1e-6)
    assert out["baseline"] == "zeros"


def test_ig_completeness_on_a_relu_cnn() -> None:
    model, x = _cnn(), _images()
    with torch.no_grad():
        gaps = model(x) - model(torch.zeros_like(x))
    # The class that moves most from the baseline: a near-zero gap would make the relative error ill-posed.
    t = gaps.abs().argmax(1)
    gap = gaps.gather(1, t[:, None]).squeeze(1).numpy()
    out = attr.integrated_gradients(model, x, t, steps=256)
    rel = np.abs(out["attributions"].reshape(4, -1).sum(1) - gap) / np.abs(gap)
    assert rel.max() < 0.01  # Gauss-Legendre across ReLU kinks: below 1% at 256 nodes
    np.testing.assert_allclose(out["relative_delta"], rel, rtol=1e-3, atol=1e-6)


def test_ig_and_smoothgrad_match_direct_captum_calls() -> None:
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    model, x, t = _cnn(), _images(), torch.tensor([2, 1, 0, 1])
    base = x.mean(0, keepdim=True).expand_as(x)
    ours = attr.integrated_gradients(model, x, t, baseline="mean", steps=32)
    ref, delta = IntegratedGradients(model).attribute(
        x, baselines=base, target=t, n_steps=32, method="gausslegendre", return_convergence_delta=True
    )
    np.testing.assert_allclose(ours["attributions"], ref.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["delta"], delta.numpy(), atol=1e-6)
    assert ours["baseline"] == "mean image"

    state = torch.get_rng_state()
    sg = attr.smoothgrad(model, x, t, sigma_share=0.2, samples=8, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    torch.manual_seed(3)
    stdev = 0.2 * float(x.max() - x.min())
    ref = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=8, stdevs=stdev, target=t)
    np.testing.assert_allclose(sg, ref.numpy(), atol=1e-6)
    ref = Saliency(model).attribute(x.clone().requires_grad_(), target=t)
    np.testing.assert_allclose(attr.saliency(model, x, t), ref.numpy(), atol=0)


def test_validation_errors_are_one_line() -> None:
    model, x = _cnn(), _images()
    for call in (
        lambda: attr.saliency(model, x[0], 0),
        lambda: attr.saliency(model, x, [0, 1]),
        lambda: attr.saliency(model, x, 3),
        lambda: attr.integrated_gradients(model, x, 0, steps=0),
        lambda: attr.integrated_gradients(model, x, 0, baseline="noise"),
        lambda: attr.randomisation_check(model, x, 0, method="gradcam"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert "\n" not in str(err.value)


def test_randomising_the_head_of_a_trained_cnn_changes_its_maps() -> None:
    from microscope.models.vision import digits_split, train_digits_cnn

    model, _ = train_digits_cnn(epochs=2)
    x = torch.from_numpy(digits_split()[2][:16])
    t = model(x).argmax(1)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    out = attr.randomisation_check(model, x, t, method="saliency")
    assert out["spearman"] < 0.5 and out["passed"]
    assert out["meaning"].count(".") >= 1 and "\n" not in out["meaning"]
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def test_layer_shares_sum_to_one() -> None:
    model, x = _cnn(), _images()
    shares = attr.layer_attribution_shares(model, x, 1, {"conv": model[0], "pool": model[2], "head": model[4]})
    assert set(shares) == {"conv", "pool", "head"}
    assert all(isinstance(v, float) and v >= 0 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)


def test_token_attributions_on_a_tiny_gpt2() -> None:
    from captum.attr import LayerIntegratedGradients
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16, bos_token_id=1, eos_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.tensor([5, 17, 42, 8, 99, 3])
    scores = attr.token_attributions(model, ids, target_position=-1, target_token=7, steps=64)
    assert scores.shape == (6,) and np.isfinite(scores).all()
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids[None])
        gap = float(model(inputs_embeds=emb).logits[0, -1, 7] - model(inputs_embeds=0 * emb).logits[0, -1, 7])
    assert abs(scores.sum() - gap) < 0.05 * abs(gap)

    # Independent reference: Captum's LayerIntegratedGradients from token 0 once its embedding row is zero.
    with torch.no_grad():
        model.get_input_embeddings().weight[0].zero_()
    lig = LayerIntegratedGradients(lambda i: model(i).logits[:, -1, 7], model.get_input_embeddings())
    ref = lig.attribute(ids[None], baselines=torch.zeros_like(ids[None]), n_steps=64, method="gausslegendre")
    scores = attr.token_attributions(model, ids, target_position=-1, target_token=7, steps=64)
    np.testing.assert_allclose(scores, ref.sum(-1)[0].detach().numpy(), atol=1e-5)
