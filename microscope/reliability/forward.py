"""What the reliability figures are computed from: a model's logits and penultimate features, in batches.

The penultimate features are the input of the model's output head (an HF model's output embeddings, else
its last `nn.Linear`): what Mahalanobis and k-NN scores are defined on (Lee et al. 2018; Sun et al. 2022).
A model without a head (an encoder) has no logits: its features are the mean-pooled last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Outputs:
    """Per sample: logits (None for an encoder without a head), features, and the target where there is one."""

    logits: np.ndarray | None  # [n, classes] float32
    features: np.ndarray  # [n, d] float32
    labels: np.ndarray | None  # [n] int64


def head_of(model: Any) -> Any | None:
    """The module whose input is the penultimate feature, or None (an encoder without an output head)."""
    from torch import nn

    get = getattr(model, "get_output_embeddings", None)
    if get is not None:
        return get()
    # quantized variants swap nn.Linear for their own linear classes (torch's dynamic int8 is not a subclass)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__.endswith("Linear")]
    return linears[-1] if linears else None


def _float_dtype(model: Any) -> Any:
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def image_outputs(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> Outputs:
    """A classifier's logits and head inputs on images `x` (float32 [n, C, H, W] in [0, 1])."""
    import torch

    head = head_of(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear output head; reliability needs a classifier")
    device, dtype = next(model.parameters()).device, _float_dtype(model)
    feats: list[np.ndarray] = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float().cpu().numpy()))
    logits = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device, dtype)
                logits.append(model(batch).float().cpu().numpy())
    finally:
        hook.remove()
    out = np.concatenate(logits)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(
            f"the model's output has shape {list(out.shape)}, not [n, classes ≥ 2]; reliability needs a classifier "
            "(set reliability to skip for regression models: --stages without reliability)"
        )
    return Outputs(out, np.concatenate(feats).reshape(len(x), -1), y.astype(np.int64))


def token_outputs(model: Any, windows: np.ndarray, positions: int, batch_size: int, seed: int) -> Outputs:
    """A causal LM's next-token logits and final hidden states at `positions` seeded positions spread over
    `windows` (int [n, T]); the target is the dataset's next token."""
    import torch

    n, t = windows.shape
    rng = np.random.default_rng(seed)
    per = max(1, -(-positions // max(n, 1)))  # positions per window, ceil
    picks = [np.sort(rng.choice(t - 1, size=min(per, t - 1), replace=False)) for _ in range(n)]
    device = next(model.parameters()).device
    logits, feats, labels = [], [], []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            ids = torch.from_numpy(windows[i : i + batch_size].astype(np.int64)).to(device)
            out = model(input_ids=ids, output_hidden_states=True)
            for j in range(len(ids)):
                pos = torch.from_numpy(picks[i + j]).to(device)
                logits.append(out.logits[j, pos].float().cpu().numpy())
                feats.append(out.hidden_states[-1][j, pos].float().cpu().numpy())
                labels.append(windows[i + j, picks[i + j] + 1])
            if sum(len(p) for p in labels) >= positions:
                break
    cut = positions
    return Outputs(
        np.concatenate(logits)[:cut], np.concatenate(feats)[:cut], np.concatenate(labels).astype(np.int64)[:cut]
    )


def window_outputs(
    model: Any, windows: np.ndarray, batch_size: int, causal: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per window (a sample of a text model's OOD test): the mean over its positions of the next-token MSP and
    negative energy (causal LMs; none for an encoder), and its mean-pooled last hidden state as the feature.
    Scores are reduced per batch, so memory holds one batch's logits, not the whole vocabulary per token."""
    import torch

    from microscope.reliability import ood

    device = next(model.parameters()).device
    scores: dict[str, list[np.ndarray]] = {"msp": [], "energy": []} if causal else {}
    feats = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[i : i + batch_size].astype(np.int64)).to(device)
            out = model(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
            feats.append(hidden.float().mean(1).cpu().numpy())
            if causal:
                z = out.logits[:, :-1].double().cpu().numpy()
                flat = z.reshape(-1, z.shape[-1])
                scores["msp"].append(ood.msp(flat).reshape(z.shape[:2]).mean(1))
                scores["energy"].append(ood.energy(flat).reshape(z.shape[:2]).mean(1))
    return {k: np.concatenate(v) for k, v in scores.items()}, np.concatenate(feats)
