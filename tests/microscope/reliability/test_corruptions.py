"""Common corruptions: contracts (shape, dtype, range, seeding) at 8×8, 28×28 and 32×32 RGB; severity ordering
and survivability on scikit-learn's 8×8 digits; the CE / mCE / relative-CE arithmetic against closed forms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from microscope.reliability.corruptions import (
    ALL,
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    corrupt,
    corruption_summary,
)

# Corruptions with no random draw: a different seed gives the same images.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
SHAPES = [(5, 1, 8, 8), (3, 1, 28, 28), (2, 3, 32, 32)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images / 16).astype(np.float32)[:, None], d.target


@pytest.fixture(scope="module")
def changes(digits: tuple[np.ndarray, np.ndarray]) -> dict[str, list[float]]:
    """Mean absolute pixel change from the clean image per corruption and severity, 300 digits, seed 0."""
    x = digits[0][:300]
    return {name: [float(np.abs(corrupt(x, name, s) - x).mean()) for s in SEVERITIES] for name in ALL}


def test_names() -> None:
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS == tuple(n for names in FAMILIES.values() for n in names)
    assert ALL == (*CORRUPTIONS, "occlusion")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
@pytest.mark.parametrize("name", ALL)
def test_contract(name: str, shape: tuple[int, int, int, int]) -> None:
    """Same shape and dtype, inside [0, 1], identical for a seed; a new seed changes the stochastic ones."""
    x = np.random.default_rng(7).random(shape, dtype=np.float32)
    for severity in (1, 5):
        a = corrupt(x, name, severity, seed=3)
        assert a.shape == x.shape and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0 and np.isfinite(a).all()
        np.testing.assert_array_equal(a, corrupt(x, name, severity, seed=3))
        other = corrupt(x, name, severity, seed=4)
        assert np.array_equal(a, other) == (name in DETERMINISTIC)
        assert not np.array_equal(a, x)
    np.testing.assert_array_equal(x, np.random.default_rng(7).random(shape, dtype=np.float32))  # input untouched


@pytest.mark.parametrize("name", ALL)
def test_severity_is_monotone_on_digits(name: str, changes: dict[str, list[float]]) -> None:
    """Non-decreasing mean change over severities 1→5 on 300 digits, strictly (no corruption saturates at 8×8:
    every table grows in every parameter here, so no tie is allowed), and severity 1 well below severity 5."""
    c = changes[name]
    assert all(b > a for a, b in zip(c, c[1:], strict=False)), c
    assert c[0] < 0.8 * c[4], c


def test_severity_one_keeps_digits_readable(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """A nearest-class-mean classifier fitted on even-indexed clean digits (≈0.90 on the odd ones) stays clearly
    above chance (0.1) at severity 1: > 0.3 for every corruption (measured ≥ 0.87), and > 0.3 at severity 3."""
    x, y = digits
    fit = np.arange(len(x)) % 2 == 0
    means = np.stack([x[fit][y[fit] == k].reshape(-1, 64).mean(0) for k in range(10)])

    def accuracy(z: np.ndarray) -> float:
        dist = ((z.reshape(len(z), 1, 64) - means[None]) ** 2).sum(-1)
        return float((dist.argmin(1) == y[~fit]).mean())

    assert accuracy(x[~fit]) > 0.85
    for name in ALL:
        for severity in (1, 3):
            assert accuracy(corrupt(x[~fit], name, severity)) > 0.3, (name, severity)


@pytest.mark.parametrize(("name", "severity"), [("gaussian", 1), ("", 1), ("snow", 0), ("snow", 6), ("snow", 2.0)])
def test_bad_arguments_raise_one_line(name: str, severity: int) -> None:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError) as info:
        corrupt(x, name, severity)
    msg = str(info.value)
    assert "\n" not in msg
    assert ("gaussian_noise" in msg and "occlusion" in msg) if name != "snow" else "1, 2, 3, 4, 5" in msg


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(np.zeros((1, 2, 8, 8), dtype=np.float32), "snow", 1)


def _table(acc: float) -> dict[str, dict[int, float]]:
    return {name: dict.fromkeys(SEVERITIES, acc) for name in ALL}


def test_summary_without_baseline() -> None:
    acc = _table(0.5)
    acc["snow"] = {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.3, 5: 0.1}
    out = corruption_summary(acc, 0.95)
    assert out["mean_corruption_accuracy"] == pytest.approx(0.5, abs=1e-12)
    assert out["corruptions"]["snow"]["accuracy"] == pytest.approx(0.5, abs=1e-12)
    assert "mce" not in out and out["undefined"] == {}
    assert all(type(v["accuracy"]) is float for v in out["corruptions"].values())


def test_ce_equal_and_half_errors() -> None:
    """Errors equal to the baseline's: CE 100 each, mCE 100; half of them: 50 (to 1e-9)."""
    base = {name: {s: 1 - 0.1 * s for s in SEVERITIES} for name in ALL}  # errors 0.1 … 0.5
    same = corruption_summary(base, 0.9, base, 0.9)
    half = corruption_summary({n: {s: 1 - 0.05 * s for s in SEVERITIES} for n in ALL}, 0.9, base, 0.9)
    for name in ALL:
        assert same["corruptions"][name]["ce"] == pytest.approx(100.0, abs=1e-9)
        assert half["corruptions"][name]["ce"] == pytest.approx(50.0, abs=1e-9)
    assert same["mce"] == pytest.approx(100.0, abs=1e-9) and half["mce"] == pytest.approx(50.0, abs=1e-9)
    assert same["relative_mce"] == pytest.approx(100.0, abs=1e-9)
    assert same["mce_corruptions"] == list(CORRUPTIONS)  # occlusion reported, not averaged
    assert type(same["mce"]) is float and same["undefined"] == {}


def test_occlusion_is_outside_mce() -> None:
    base = _table(0.5)
    acc = _table(0.5) | {"occlusion": dict.fromkeys(SEVERITIES, 0.0)}  # error 1.0: CE 200
    out = corruption_summary(acc, 0.9, base, 0.9)
    assert out["corruptions"]["occlusion"]["ce"] == pytest.approx(200.0, abs=1e-9)
    assert out["mce"] == pytest.approx(100.0, abs=1e-9)


def test_relative_ce_closed_form() -> None:
    """Model clean error .1, corruption errors .2,.3 at severities 1,2; baseline clean error .2, errors .4,.6.
    Relative CE = 100·((.2−.1)+(.3−.1)) / ((.4−.2)+(.6−.2)) = 100·.3/.6 = 50; CE = 100·.5/1.0 = 50.
    A second corruption with the same model errors but baseline errors .3,.3 gives 100·.3/.2 = 150 and CE 100·.5/.6.
    """
    acc = {"fog": {1: 0.8, 2: 0.7}, "snow": {1: 0.8, 2: 0.7}}
    base = {"fog": {1: 0.6, 2: 0.4}, "snow": {1: 0.7, 2: 0.7}}
    out = corruption_summary(acc, 0.9, base, 0.8)
    assert out["corruptions"]["fog"]["relative_ce"] == pytest.approx(50.0, abs=1e-9)
    assert out["corruptions"]["fog"]["ce"] == pytest.approx(50.0, abs=1e-9)
    assert out["corruptions"]["snow"]["relative_ce"] == pytest.approx(150.0, abs=1e-9)
    assert out["corruptions"]["snow"]["ce"] == pytest.approx(100 * 0.5 / 0.6, abs=1e-9)
    assert out["relative_mce"] == pytest.approx(100.0, abs=1e-9)
    assert out["mce_corruptions"] == ["snow", "fog"]  # the paper's order, whatever the dict's


def test_string_severity_keys_as_in_json_records() -> None:
    acc: dict[str, Any] = {"fog": {"1": 0.8, "2": 0.7}}
    out = corruption_summary(acc, 0.9, {"fog": {1: 0.6, 2: 0.4}}, 0.8)
    assert out["corruptions"]["fog"]["ce"] == pytest.approx(50.0, abs=1e-9)


def test_zero_error_baseline_is_undefined_not_inf() -> None:
    acc = {"fog": {1: 0.8}, "snow": {1: 0.8}}
    base = {"fog": {1: 1.0}, "snow": {1: 0.5}}
    out = corruption_summary(acc, 0.9, base, 1.0)
    assert out["corruptions"]["fog"]["ce"] is None and out["corruptions"]["fog"]["relative_ce"] is None
    assert "no error" in out["undefined"]["fog.ce"]
    assert "fog.relative_ce" in out["undefined"]
    assert out["corruptions"]["snow"]["ce"] == pytest.approx(40.0, abs=1e-9)
    assert out["mce"] is None and "fog" in out["undefined"]["mce"]
    assert out["relative_mce"] is None and "relative_mce" in out["undefined"]


def test_baseline_without_clean_accuracy_leaves_relative_undefined() -> None:
    out = corruption_summary({"fog": {1: 0.8}}, 0.9, {"fog": {1: 0.6}})
    assert out["corruptions"]["fog"]["ce"] == pytest.approx(50.0, abs=1e-9)
    assert out["corruptions"]["fog"]["relative_ce"] is None and out["mce"] == pytest.approx(50.0, abs=1e-9)
    assert "clean" in out["undefined"]["fog.relative_ce"]
