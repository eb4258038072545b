"""Robustness: our AutoAttack equals calling pyautoattack directly; PGD/FGSM sweeps behave as the
definitions say; the text surfaces' affine box is exact and leaves the model's clean outputs unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microscope.figures import split
from microscope.models.vision import DigitsCNN
from microscope.robustness import summary
from microscope.robustness.attacks import pgd, sweep
from microscope.robustness.reference import autoattack
from microscope.robustness.surfaces import CausalSurface, EmbeddingBox, RetrievalSurface
from tests.conftest import build_model


@pytest.fixture(scope="module")
def digits(digits_cnn: tuple[Path, Path]) -> tuple[DigitsCNN, torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(digits_cnn[0])))
    d = np.load(digits_cnn[1])
    return model.eval(), torch.from_numpy(d["x"][:24]), torch.from_numpy(d["y"][:24])


def test_autoattack_identity_with_the_reference(digits, tmp_path: Path) -> None:
    """Same model, samples, version, norm, ε and seed: the robust accuracy and the per-sample outcome of
    our run equal pyautoattack's own, exactly."""
    from pyautoattack import AutoAttack

    model, x, y = digits
    ours = autoattack(model, x, y, "L2", 0.5, "custom", ["apgd-ce", "apgd-t"], 0, 24, tmp_path / "state.json")
    aa = AutoAttack(model, norm="L2", eps=0.5, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=24)
    assert ours["robust"] == (y_adv == y).sum().item() / len(y)
    assert ours["robust_flags"] == (y_adv == y).tolist()
    assert ours["clean"] == (model(x).argmax(1) == y).sum().item() / len(y)
    assert set(ours["per_attack"]) == {"apgd-ce", "apgd-t"} and ours["per_attack"]["apgd-t"] == ours["robust"]
    assert 0 < ours["robust"] < ours["clean"]  # the attack really bites at L2 0.5 on 8×8 digits

    again = autoattack(model, x, y, "L2", 0.5, "custom", ["apgd-ce", "apgd-t"], 0, 24, tmp_path / "state.json")
    assert again["resumed"] and again["robust_flags"] == ours["robust_flags"]  # the state file: nothing re-run


def test_pgd_sweep_properties(digits) -> None:
    model, x, y = digits
    clean = (model(x).argmax(1) == y).sum().item() / len(y)
    robust, adv = pgd(model, x, y, 0.0, steps=10, restarts=2, seed=0)
    assert robust.sum().item() / len(y) == clean and torch.equal(adv, x)  # ε = 0 changes nothing
    eps = [0.0, 2 / 255, 8 / 255, 32 / 255, 64 / 255]
    curves, adv = sweep(model, x, y, eps, steps=10, restarts=2, seed=0, batch_size=16)
    assert curves["clean"][0] == clean and curves["pgd"][0] == clean and curves["fgsm"][0] == clean
    for attack in ("pgd", "fgsm"):
        assert all(a >= b for a, b in zip(curves[attack], curves[attack][1:], strict=False)), curves[attack]
    assert curves["pgd"][-1] < 0.5 * clean  # a real trade-off
    assert all(p <= f + 1e-9 for p, f in zip(curves["pgd"], curves["fgsm"], strict=True))  # PGD ⊇ FGSM here
    assert float((adv - x).abs().max()) <= 64 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


class Constant(torch.nn.Module):
    """Robust by construction: the same logits whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 2.0, 1.0]).expand(len(x), 3) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_a_constant_classifier_stays_at_its_clean_accuracy() -> None:
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 0, 1, 2, 1, 1, 0, 1, 2, 1, 1, 1])
    clean = (y == 1).sum().item() / len(y)
    curves, _ = sweep(Constant(), x, y, [0.0, 0.1, 0.5, 1.0], steps=5, restarts=2, seed=0, batch_size=12)
    assert curves["pgd"] == curves["fgsm"] == curves["noise"] == [clean] * 4
    aa = autoattack(Constant(), x, y, "Linf", 0.5, "custom", ["apgd-ce", "apgd-dlr"], 0, 12)
    assert aa["robust"] == clean and any("zero gradient" in f for f in aa["flags"])  # its warning surfaced


def test_a_classifier_that_is_never_right_has_undefined_robust_accuracy() -> None:
    """Constant predicts class 1 for every input; with no sample of class 1, clean accuracy is 0 and there
    is nothing to attack: robust accuracy is undefined with its reason, not a reassuring-looking 0."""
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2] * 6)
    curves, _ = sweep(Constant(), x, y, [0.0, 0.1, 0.5], steps=3, restarts=1, seed=0, batch_size=12)
    aa = autoattack(Constant(), x, y, "Linf", 0.5, "custom", ["apgd-ce"], 0, 12)
    assert curves["clean"] == [0.0] and aa["robust"] == 0.0
    figs = summary.figures(curves, [aa], len(x))
    metrics, undefined = split(figs)
    assert metrics == {"clean_accuracy": 0.0, "samples": 12.0}  # clean accuracy itself is defined
    assert set(undefined) == {"autoattack_Linf", "pgd_min", "fgsm_min", "noise_min"}
    assert all("clean accuracy is 0 on 12 samples" in why for why in undefined.values())
    # A classifier that is right somewhere keeps its figures.
    y_some = torch.tensor([1, 0, 2] * 4)
    curves, _ = sweep(Constant(), x, y_some, [0.0, 0.1], steps=3, restarts=1, seed=0, batch_size=12)
    metrics, undefined = split(summary.figures(curves, [], len(x)))
    assert undefined == {} and metrics["pgd_min"] == pytest.approx(4 / 12)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_text_surface_box_is_exact_and_clean_outputs_unchanged(family: str) -> None:
    model = build_model(family)
    box = EmbeddingBox(model.get_input_embeddings().weight)
    e = model.get_input_embeddings().weight.detach()[torch.arange(0, 512, 7)]
    u = box.to_box(e)
    assert float(u.min()) >= 0 and float(u.max()) <= 1  # every token embedding lies in the box
    assert float((box.from_box(u) - e).abs().max()) <= 1e-6
    ids = torch.randint(0, 512, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if family == "bert":
            surface = RetrievalSurface(model)
            x = surface.inputs(ids)
            surface.set_anchors(x)
            ref = model(input_ids=ids).last_hidden_state.mean(1)
            ref = torch.nn.functional.normalize(ref, dim=-1)
            assert float((surface.pooled(x) - ref).abs().max()) <= 1e-5
            assert torch.equal(surface(x).argmax(1), torch.arange(5))  # each input retrieves itself
        else:
            surface = CausalSurface(model)
            x = surface.inputs(ids)
            assert x.shape == (5, 1, 12, model.config.hidden_size)
            ref = model(input_ids=ids).logits[:, -1]
            assert float((surface(x) - ref).abs().max()) <= 1e-5
    assert surface.to_units(0.1) == pytest.approx(0.1 * float(box.scale.median()))
