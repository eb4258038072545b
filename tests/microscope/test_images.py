"""Image datasets for classifiers: read as saved, and every malformed file refused with one line that
names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from microscope.errors import InputError
from microscope.images import images_digest, read_images


def test_reads_and_digests(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    y = np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rx, ry = read_images(tmp_path / "d.npz")
    assert rx.shape == (5, 1, 8, 8) and np.array_equal(rx[:, 0], x) and np.array_equal(ry, y)
    assert images_digest(rx, ry) == images_digest(rx.copy(), ry.copy()) != images_digest(rx, ry[::-1].copy())


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 1, 4, 4), np.float32)}, "no array 'y'"),
        ({"x": np.full((2, 1, 4, 4), 3.0), "y": np.zeros(2, int)}, "in [0, 1]"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.zeros(3, int)}, "one non-negative integer label per image"),
        ({"x": np.zeros((0, 1, 4, 4)), "y": np.zeros(0, int)}, "N ≥ 1"),
        ({"x": np.array([None, 1], dtype=object), "y": np.zeros(2, int)}, "not a readable .npz"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        read_images(tmp_path / "bad.npz")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable"):
        read_images(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="does not exist"):
        read_images(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("shape", "labels", "message"),
    [
        (
            (4, 3, 8, 8),
            9,
            r"x has shape \(N=4, 3, 8, 8\) but the model takes \(1, 8, 8\) images; give x shape \(N, 1, 8, 8\)",
        ),
        (
            (4, 1, 16, 16),
            9,
            r"cannot run 1×16×16 images \(mat1 and mat2 shapes cannot be multiplied \(1x2048 and 512x64\)\)",
        ),
        ((4, 3, 16, 16), 9, r"cannot run 3×16×16 images \(Given groups=1, weight of size \[16, 1, 3, 3\]"),
        ((4, 1, 8, 8), 10, r"y holds label 10 but the model has 10 classes \(labels 0-9\)"),
    ],
)
def test_images_the_model_cannot_take_are_refused(shape: tuple, labels: int, message: str) -> None:
    """Issue 21 D13-D15: checked with one forward, not found stages later as a torch error."""
    from microscope.images import check_fits
    from microscope.models.vision import DigitsCNN

    x = np.random.default_rng(0).random(shape).astype(np.float32)
    y = np.zeros(shape[0], np.int64)
    y[-1] = labels  # the largest label
    with pytest.raises(InputError, match=message) as err:
        check_fits(DigitsCNN().eval(), x, y, "d.npz")
    assert "\n" not in str(err.value)
    assert check_fits(DigitsCNN().eval(), np.zeros((4, 1, 8, 8), np.float32), np.arange(4), "d.npz") == 10


def test_an_mlp_or_a_model_that_is_no_classifier_is_named() -> None:
    import torch
    from torch import nn

    from microscope.images import check_fits

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(InputError, match=r"256 values per image, but the model's first layer takes 64"):
        check_fits(mlp, np.zeros((2, 1, 16, 16), np.float32), np.zeros(2, int), "m.npz")

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.raises(InputError, match=r"answers one image with \(1, 2, 6, 6\), not \[1, classes\] logits"):
        check_fits(Features(), np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, int), "f.npz")
