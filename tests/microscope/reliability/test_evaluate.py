"""The reliability evaluation's refusals (one line naming the fix) and its sample split, on small real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from microscope.errors import InputError
from microscope.reliability.evaluate import evaluate_images, knn_k, sample_split
from microscope.reliability.shifted import user_ood
from schemas.config import ReliabilityConfig


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def test_a_regression_model_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()  # one output: no classes
    x = np.random.default_rng(0).uniform(0, 1, (20, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError) as err:
        evaluate_images(model, x, np.zeros(20, dtype=np.int64), ReliabilityConfig(), 0)
    assert "not [n, classes ≥ 2]; reliability needs a classifier" in _one_line(err.value)


def test_too_few_samples_are_refused_and_the_split_is_seeded_and_disjoint() -> None:
    with pytest.raises(ValueError) as err:
        sample_split(1, ReliabilityConfig(), 0)
    assert _one_line(err.value) == "reliability needs at least 2 samples, the dataset has 1; add data"
    rc = ReliabilityConfig(samples=300, temperature_split=0.4)
    fit, ev = sample_split(1000, rc, 7)
    assert len(fit) == 120 and len(ev) == 180 and not set(fit) & set(ev)
    again = sample_split(1000, rc, 7)
    assert (again[0] == fit).all() and (again[1] == ev).all()
    assert knn_k(ReliabilityConfig(), 225) == 1 and knn_k(ReliabilityConfig(), 50_000) == 50
    assert knn_k(ReliabilityConfig(knn_k=80), 40) == 40  # never more than the fit split


def test_an_ood_set_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "ood.txt"
    text.write_text("words, not images\n")
    like = np.zeros((4, 1, 8, 8), dtype=np.float32)
    with pytest.raises(InputError) as err:
        user_ood(str(text), "images", like, None)
    assert "is not an image dataset but the audit's model is an image classifier" in _one_line(err.value)
    images = tmp_path / "ood.npz"
    np.savez(images, x=np.zeros((3, 1, 4, 4), dtype=np.float32), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(InputError) as err:
        user_ood(str(images), "images", like, None)
    assert "has images of shape [1, 4, 4], the audit's are [1, 8, 8]" in _one_line(err.value)
    with pytest.raises(InputError) as err:
        user_ood(str(tmp_path / "missing.txt"), "text", np.zeros((2, 8), dtype=np.int64), None)
    assert "does not exist" in _one_line(err.value)


def test_a_user_ood_image_set_is_scored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    rc = ReliabilityConfig(corruptions=["gaussian_noise"], severities=[1, 5], corruption_samples=10)
    r = evaluate_images(model, x, y, rc, 0)
    assert set(r["ood"]) == {"rotated-inverted", "uniform-noise"} and r["n"] == 60
    assert set(r["corruptions"]["accuracy"]) == {"gaussian_noise"} and r["corruptions"]["n"] == 10
    assert set(r["corruptions"]["accuracy"]["gaussian_noise"]) == {"1", "5"}


def test_the_config_knows_every_corruption_and_refuses_others() -> None:
    from pydantic import ValidationError

    from microscope.reliability.corruptions import ALL
    from schemas.config import CORRUPTION_NAMES

    assert CORRUPTION_NAMES == ALL
    with pytest.raises(ValidationError, match="unknown corruption 'blurr'; choose from gaussian_noise"):
        ReliabilityConfig(corruptions=["blurr"])
    with pytest.raises(ValidationError, match="severities must be a non-empty list of 1 to 5"):
        ReliabilityConfig(severities=[0, 6])


def test_published_baseline_errors_normalise_the_corruption_errors() -> None:
    """Errors equal to the reference model's give CE 100 per corruption and mCE 100 (AlexNet's convention);
    twice its error 200, whatever the model's own clean error."""
    from microscope.stages.reliability import vs_published

    acc = {"fog": {"1": 0.9, "3": 0.7}, "contrast": {"1": 0.8, "3": 0.6}}
    corruptions = {"accuracy": acc, "clean_accuracy": 0.95, "n": 100}
    same = {c: {int(s): 1 - a for s, a in by.items()} for c, by in acc.items()}
    r = vs_published(corruptions, ReliabilityConfig(baseline_errors=same, baseline_clean_error=0.02))
    assert r is not None and {c: f["ce"] for c, f in r["corruptions"].items()} == pytest.approx(
        {"fog": 100.0, "contrast": 100.0}, abs=1e-9
    )
    assert r["mce"] == pytest.approx(100.0, abs=1e-9)
    # relative: Σ(E − E_clean) / Σ(E_ref − E_ref_clean): fog (0.1 + 0.3 − 2·0.05) / (0.1 + 0.3 − 2·0.02)
    assert r["corruptions"]["fog"]["relative_ce"] == pytest.approx(100 * 0.3 / 0.36, abs=1e-9)
    half = {c: {s: e / 2 for s, e in by.items()} for c, by in same.items()}
    r2 = vs_published(corruptions, ReliabilityConfig(baseline_errors=half))
    assert r2 is not None and r2["mce"] == pytest.approx(200.0, abs=1e-9)
    assert vs_published(corruptions, ReliabilityConfig()) is None  # no published errors: no normalised figure
