"""An encoder's nearest texts for `microscope steer`: pooled embeddings equal a plain forward's mean-pooled last
hidden state, and the nearest rows equal NumPy's cosine ranking."""

from __future__ import annotations

import numpy as np
import torch

from microscope.steering_audit import nearest_windows, pooled
from tests.conftest import build_model


def test_pooled_and_nearest_match_numpy() -> None:
    model = build_model("bert")
    windows = torch.from_numpy(np.random.default_rng(0).integers(5, 500, (10, 12)))
    table = pooled(model, windows, batch=3)  # batches of 3: the rows do not depend on the batching
    with torch.no_grad():
        want = model(input_ids=windows).last_hidden_state.double().mean(1)
    assert torch.allclose(table, want, atol=1e-6)
    query = table[4] + 0.01 * torch.randn(
        table.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    t, q = table.numpy(), query.numpy()
    cos = t @ q / (np.linalg.norm(t, axis=1) * np.linalg.norm(q))
    got = nearest_windows(table, query, k=3)
    assert [i for i, _ in got] == list(np.argsort(-cos, kind="stable")[:3]) and got[0][0] == 4
    assert np.allclose([c for _, c in got], np.sort(cos)[::-1][:3], atol=1e-12)
