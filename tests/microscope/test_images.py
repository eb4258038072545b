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
