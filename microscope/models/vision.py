"""A small reference CNN for 8×8 digit images, and its deterministic training on scikit-learn's bundled
digits: the vision model of the demo and of the robustness tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions and a linear head; input [N, 1, 8, 8] pixels in [0, 1], output 10 logits."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * channels * 4 * 4, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = self.pool(torch.relu(self.conv2(h)))
        return self.head(torch.relu(self.fc(h.flatten(1))))


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 bundled 8×8 digits as [N, 1, 8, 8] float32 in [0, 1] (pixel / 16), split
    into train and held-out test by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def train_digits_cnn(epochs: int = 30, seed: int = 0, **kwargs: Any) -> tuple[DigitsCNN, float]:
    """Deterministic training (fixed seeds, one thread, full-batch order from a seeded generator);
    returns the model and its held-out accuracy."""
    xtr, ytr, xte, yte = digits_split(seed=seed)
    torch.manual_seed(seed)
    model = DigitsCNN(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order: the same weights on every machine
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(xt), generator=gen).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(1) == torch.from_numpy(yte)).float().mean())
    return model, acc
