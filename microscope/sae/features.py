"""The features table: per latent its density, mean activation, top-activating contexts (as text) and,
where the model has an unembedding, the tokens its decoder direction promotes and suppresses."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def top_activations(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    d_sae: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Over (activations [n, d], window [n], position [n]) batches: per latent the k largest activations
    and where they occurred, plus firing counts and activation sums. Memory O(d_sae · k)."""
    best_v = torch.full((d_sae, k), -torch.inf)
    best_w = torch.zeros((d_sae, k), dtype=torch.long)
    best_p = torch.zeros((d_sae, k), dtype=torch.long)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    sums = torch.zeros(d_sae, dtype=torch.float64)
    for x, win, pos in batches:
        acts = encode(torch.from_numpy(np.ascontiguousarray(x)).float())  # [n, d_sae]
        fires += (acts > 0).sum(0).double()
        sums += acts.sum(0).double()
        kk = min(k, acts.shape[0])
        v, i = acts.T.topk(kk, dim=1)  # [d_sae, kk]
        w = torch.from_numpy(win.astype(np.int64))[i]
        p = torch.from_numpy(pos.astype(np.int64))[i]
        cat_v = torch.cat([best_v, v], 1)
        order = cat_v.topk(k, dim=1).indices
        best_v = cat_v.gather(1, order)
        best_w = torch.cat([best_w, w], 1).gather(1, order)
        best_p = torch.cat([best_p, p], 1).gather(1, order)
    return best_v.numpy(), best_w.numpy(), best_p.numpy(), fires.numpy(), sums.numpy()


def contexts(
    tokenizer: Any, ids: np.ndarray, values: np.ndarray, windows: np.ndarray, positions: np.ndarray, span: int
) -> list[list[dict[str, Any]]]:
    """For each latent, its top contexts: text left of the token, the token, text right, activation."""
    out = []
    for v_row, w_row, p_row in zip(values, windows, positions, strict=True):
        rows = []
        for v, w, p in zip(v_row, w_row, p_row, strict=True):
            if not np.isfinite(v) or v <= 0:
                continue
            seq = ids[w]
            left = tokenizer.decode(seq[max(0, p - span) : p].tolist())
            tok = tokenizer.decode([int(seq[p])])
            right = tokenizer.decode(seq[p + 1 : p + 1 + span].tolist())
            rows.append(
                {
                    "left": left,
                    "token": tok,
                    "right": right,
                    "activation": float(v),
                    "window": int(w),
                    "position": int(p),
                }
            )
        out.append(rows)
    return out


def logit_effects(
    W_dec: np.ndarray, W_U: np.ndarray, tokenizer: Any, k: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Tokens whose logits each decoder direction raises and lowers most (direct path, no final norm)."""
    effects = W_dec @ W_U.T  # [d_sae, vocab]
    top = np.argsort(-effects, axis=1)[:, :k]
    bottom = np.argsort(effects, axis=1)[:, :k]
    decode = np.vectorize(lambda t: tokenizer.decode([int(t)]), otypes=[object])
    return decode(top).tolist(), decode(bottom).tolist()


def table(
    density: np.ndarray,
    mean_act: np.ndarray,
    ctx: list[list[dict[str, Any]]],
    pos_logits: list[list[str]] | None,
    neg_logits: list[list[str]] | None,
) -> Any:
    import pyarrow as pa

    ctx_type = pa.list_(
        pa.struct(
            [
                ("left", pa.string()),
                ("token", pa.string()),
                ("right", pa.string()),
                ("activation", pa.float32()),
                ("window", pa.int32()),
                ("position", pa.int32()),
            ]
        )
    )
    cols = {
        "feature": pa.array(np.arange(len(density), dtype=np.int32)),
        "density": pa.array(density.astype(np.float64)),
        "mean_activation": pa.array(mean_act.astype(np.float64)),
        "top_contexts": pa.array(ctx, type=ctx_type),
    }
    if pos_logits is not None and neg_logits is not None:
        cols["top_logits"] = pa.array(pos_logits, type=pa.list_(pa.string()))
        cols["bottom_logits"] = pa.array(neg_logits, type=pa.list_(pa.string()))
    return pa.table(cols)
