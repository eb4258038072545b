"""The features table: per latent its density, mean activation, top-activating contexts (as text, with the
latent's activation at every token of each context) and, where the model has an unembedding, the tokens
its decoder direction promotes and suppresses; per quantized variant, each latent's fate (its density on
the variant's activations and its correlation with itself on full precision)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

# The activation histogram's bins: log-spaced over 10⁻³ … 10³ (an activation below the first edge counts
# in the first bin, above the last in the last): one pass, no per-latent maximum needed in advance.
HIST_EDGES = np.logspace(-3.0, 3.0, 25)


def activation_histogram(acts: torch.Tensor, hist: torch.Tensor) -> None:
    """Add the positive activations of `acts` [n, d_sae] to `hist` [d_sae, len(HIST_EDGES) − 1]."""
    rows, cols = torch.nonzero(acts > 0, as_tuple=True)
    if not len(rows):
        return
    inner = torch.from_numpy(HIST_EDGES[1:-1]).to(acts.dtype)
    bins = torch.bucketize(acts[rows, cols], inner, right=True)  # 0 … len(edges) − 2
    hist.view(-1).index_add_(0, cols * hist.shape[1] + bins, torch.ones_like(bins, dtype=hist.dtype))


@torch.no_grad()
def top_activations(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    d_sae: int,
    k: int,
    hist: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Over (activations [n, d], window [n], position [n]) batches: per latent the k largest activations
    and where they occurred, plus firing counts and activation sums; with `hist` ([d_sae, 24] int64), each
    latent's activation histogram over HIST_EDGES is added to it. Memory O(d_sae · k)."""
    best_v = torch.full((d_sae, k), -torch.inf)
    best_w = torch.zeros((d_sae, k), dtype=torch.long)
    best_p = torch.zeros((d_sae, k), dtype=torch.long)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    sums = torch.zeros(d_sae, dtype=torch.float64)
    for x, win, pos in batches:
        acts = encode(torch.from_numpy(np.ascontiguousarray(x)).float())  # [n, d_sae]
        fires += (acts > 0).sum(0).double()
        sums += acts.sum(0).double()
        if hist is not None:
            activation_histogram(acts, hist)
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


def context_grid(
    values: np.ndarray, windows: np.ndarray, positions: np.ndarray, seq_len: int, span: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token each top context shows: (latent, window, position), each [d_sae, k, 2·span + 1], the
    last axis running over positions p − span .. p + span. Slots outside the window, and those of contexts
    `contexts` drops (no activation > 0), have position −1."""
    d_sae, k = values.shape
    offsets = np.arange(-span, span + 1)  # [2span+1]
    latent = np.broadcast_to(np.arange(d_sae)[:, None, None], (d_sae, k, len(offsets)))
    window = np.broadcast_to(windows.astype(np.int64)[:, :, None], latent.shape)
    position = positions.astype(np.int64)[:, :, None] + offsets  # [d_sae, k, 2span+1]
    shown = (np.isfinite(values) & (values > 0))[:, :, None]
    position = np.where(shown & (position >= 0) & (position < seq_len), position, -1)
    return latent, window, position


@torch.no_grad()
def activations_at(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    latent: np.ndarray,
    window: np.ndarray,
    position: np.ndarray,
) -> np.ndarray:
    """Latent `latent[i]`'s activation at token (`window[i]`, `position[i]`), for arrays of any one shape,
    in one pass over (activations [n, d], window [n], position [n]) batches. float32, NaN where position
    is −1 or the token is in no batch. Memory O(entries) beside one encoded batch."""
    shape = latent.shape
    lat, win, pos = (np.asarray(a, dtype=np.int64).ravel() for a in (latent, window, position))
    out = np.full(lat.size, np.nan, dtype=np.float32)
    slot = np.flatnonzero(pos >= 0)  # the entries wanted, sorted by token key below
    key = (win[slot] << 32) | pos[slot]
    order = np.argsort(key, kind="stable")
    slot, key = slot[order], key[order]
    for x, bw, bp in batches:
        bkey = (bw.astype(np.int64) << 32) | bp.astype(np.int64)  # [n]
        lo = np.searchsorted(key, bkey, "left")
        counts = np.searchsorted(key, bkey, "right") - lo  # entries wanted at each row's token
        if not counts.any():
            continue
        # The whole batch is encoded, as in `top_activations`: an encoder may depend on its batch (BatchTopK
        # before its threshold is estimated), and a context's centre must reproduce its stored activation.
        acts = encode(torch.from_numpy(np.ascontiguousarray(x)).float())  # [n, d_sae]
        rows = np.repeat(np.arange(len(bkey)), counts)  # [m]: a batch row per wanted entry
        ends = np.cumsum(counts)
        ent = np.arange(ends[-1]) - np.repeat(ends - counts, counts) + np.repeat(lo, counts)  # [m] into key
        got = acts[torch.from_numpy(rows), torch.from_numpy(lat[slot[ent]])]  # [m]
        out[slot[ent]] = got.float().cpu().numpy()
    return out.reshape(shape)


def contexts(
    tokenizer: Any,
    ids: np.ndarray,
    values: np.ndarray,
    windows: np.ndarray,
    positions: np.ndarray,
    span: int,
    token_acts: np.ndarray | None = None,
) -> list[list[dict[str, Any]]]:
    """For each latent, its top contexts: text left of the token, the token, text right, activation; and
    the context token by token: `tokens` (positions p − span .. p + span clipped to the window, each
    decoded alone), `activations` (the latent at each of them: `token_acts` [d_sae, k, 2·span + 1] from
    `activations_at` over `context_grid`; NaN without it) and `center` (the top token's index)."""
    out = []
    piece: dict[int, str] = {}  # token id -> its text: a context shows few distinct tokens, decoded once

    def decode1(t: int) -> str:
        if t not in piece:
            piece[t] = tokenizer.decode([t])
        return piece[t]

    seq_len = ids.shape[1]
    for i, (v_row, w_row, p_row) in enumerate(zip(values, windows, positions, strict=True)):
        rows = []
        for j, (v, w, p) in enumerate(zip(v_row, w_row, p_row, strict=True)):
            if not np.isfinite(v) or v <= 0:
                continue
            seq = ids[w]
            lo, hi = max(0, p - span), min(seq_len, p + span + 1)
            left = tokenizer.decode(seq[lo:p].tolist())
            tok = tokenizer.decode([int(seq[p])])
            right = tokenizer.decode(seq[p + 1 : hi].tolist())
            acts = (
                token_acts[i, j, lo - (p - span) : hi - (p - span)]
                if token_acts is not None
                else np.full(hi - lo, np.nan, np.float32)
            )
            rows.append(
                {
                    "left": left,
                    "token": tok,
                    "right": right,
                    "activation": float(v),
                    "window": int(w),
                    "position": int(p),
                    "tokens": [decode1(int(t)) for t in seq[lo:hi]],
                    "activations": acts.astype(np.float32).tolist(),
                    "center": int(p - lo),
                }
            )
        out.append(rows)
    return out


class Misaligned(ValueError):
    """Two activation datasets that should hold the same tokens in the same order do not."""


def _paired(
    a: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], b: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> Iterator[tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]]:
    """Equal-length pieces of two (x, window, position) streams whose batch boundaries may differ; raises
    Misaligned when one stream has rows the other has not."""
    ia, ib = iter(a), iter(b)
    ra: tuple[np.ndarray, ...] | None = None
    rb: tuple[np.ndarray, ...] | None = None
    seen = 0
    while True:
        ra = ra if ra is not None and len(ra[1]) else next(ia, None)
        rb = rb if rb is not None and len(rb[1]) else next(ib, None)
        if ra is None or rb is None:
            rest_a = (len(ra[1]) if ra is not None else 0) + sum(len(t[1]) for t in ia)
            rest_b = (len(rb[1]) if rb is not None else 0) + sum(len(t[1]) for t in ib)
            if rest_a or rest_b:
                raise Misaligned(
                    f"row counts differ: full precision has {seen + rest_a} rows, the variant {seen + rest_b}"
                )
            return
        m = min(len(ra[1]), len(rb[1]))
        if m:
            yield tuple(t[:m] for t in ra), tuple(t[:m] for t in rb)
        ra, rb = tuple(t[m:] for t in ra), tuple(t[m:] for t in rb)
        seen += m


@torch.no_grad()
def variant_fate(
    encode: Callable[[torch.Tensor], torch.Tensor],
    fp_batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    variant_batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    d_sae: int,
    block_rows: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray, int]:
    """What quantization does to each latent, over row-aligned (x, window, position) batches of the same
    tokens: (density [d_sae]: firing fraction on the variant's activations; corr [d_sae]: Pearson
    correlation of the latent on full precision against on the variant; rows compared). corr is NaN where
    it is undefined: a latent that never fires in either, or is constant on one side (0/0). Raises
    Misaligned where the streams' windows/positions differ. Co-moments are merged per block (Chan et al.),
    in float64, so a dense latent's large mean does not cancel its covariance; `block_rows` bounds the
    float64 temporaries to about block_rows·8 bytes per side."""
    n = 0
    fires = torch.zeros(d_sae, dtype=torch.float64)
    mean_a = torch.zeros(d_sae, dtype=torch.float64)
    mean_b = torch.zeros(d_sae, dtype=torch.float64)
    m2a = torch.zeros(d_sae, dtype=torch.float64)
    m2b = torch.zeros(d_sae, dtype=torch.float64)
    cab = torch.zeros(d_sae, dtype=torch.float64)
    step = max(1, block_rows // max(1, d_sae))
    for (xa, wa, pa), (xb, wb, pb) in _paired(fp_batches, variant_batches):
        if not (np.array_equal(wa, wb) and np.array_equal(pa, pb)):
            bad = int(np.flatnonzero((wa != wb) | (pa != pb))[0])
            raise Misaligned(
                f"row {n + bad}: full precision is (window {int(wa[bad])}, position {int(pa[bad])}), "
                f"the variant (window {int(wb[bad])}, position {int(pb[bad])})"
            )
        acts_a = encode(torch.from_numpy(np.ascontiguousarray(xa)).float())  # [m, d_sae]
        acts_b = encode(torch.from_numpy(np.ascontiguousarray(xb)).float())
        fires += (acts_b > 0).sum(0).double()
        for lo in range(0, len(acts_a), step):
            a, b = acts_a[lo : lo + step].double(), acts_b[lo : lo + step].double()  # [r, d_sae]
            r = len(a)
            ma, mb = a.mean(0), b.mean(0)
            da, db = ma - mean_a, mb - mean_b
            total = n + r
            w = n * r / total
            m2a += ((a - ma) ** 2).sum(0) + da**2 * w
            m2b += ((b - mb) ** 2).sum(0) + db**2 * w
            cab += ((a - ma) * (b - mb)).sum(0) + da * db * w
            mean_a += da * (r / total)
            mean_b += db * (r / total)
            n = total
    if n == 0:
        raise Misaligned("no rows to compare")
    denom = (m2a * m2b).sqrt()
    corr = torch.where(denom > 0, cab / denom.clamp_min(1e-300), torch.tensor(float("nan"), dtype=torch.float64))
    return (fires / n).numpy(), corr.clamp(-1, 1).numpy(), n


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
    fate: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    hist: np.ndarray | None = None,
) -> Any:
    """One row per latent. `fate` maps a variant's name to its (density, corr) from `variant_fate`:
    columns `density[<variant>]` and `corr[<variant>]`; `hist` [d_sae, bins] the column `activation_hist`
    (counts over HIST_EDGES)."""
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
                ("tokens", pa.list_(pa.string())),
                ("activations", pa.list_(pa.float32())),
                ("center", pa.int32()),
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
    if hist is not None:
        cols["activation_hist"] = pa.array(hist.astype(np.int64).tolist(), type=pa.list_(pa.int64()))
    for name, (v_density, corr) in (fate or {}).items():
        cols[f"density[{name}]"] = pa.array(np.asarray(v_density, dtype=np.float64))
        cols[f"corr[{name}]"] = pa.array(np.asarray(corr, dtype=np.float64))
    return pa.table(cols)
