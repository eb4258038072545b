"""Per-token activations across top contexts and each latent's fate on a quantized variant, checked
against a NumPy SAE and brute-force recomputation (tolerance 1e-5, relative to float32 activations)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from microscope.sae import features as feat

D_IN, D_SAE, N_WIN, SEQ, K = 6, 20, 7, 9, 3
TOL = 1e-5


class NumpySAE:
    """A random SAE written in NumPy: relu((x − b_dec) W_enc + b_enc), optionally keeping the top k."""

    def __init__(self, seed: int = 0, k: int | None = None):
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((D_IN, D_SAE)).astype(np.float32)
        self.b_enc = rng.normal(-0.5, 0.5, D_SAE).astype(np.float32)
        self.b_dec = rng.normal(0, 0.2, D_IN).astype(np.float32)
        self.k = k

    def numpy(self, x: np.ndarray) -> np.ndarray:
        pre = (x.astype(np.float64) - self.b_dec) @ self.W + self.b_enc  # [n, d_sae]
        acts = np.maximum(pre, 0)
        if self.k is not None:
            drop = np.argsort(-pre, axis=1)[:, self.k :]
            np.put_along_axis(acts, drop, 0, 1)
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # what the code under test sees
        return torch.from_numpy(self.numpy(x.numpy()).astype(np.float32))


def traced(seed: int = 1, missing: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (window, position) of N_WIN windows of SEQ tokens, shuffled, one token optionally left out."""
    rng = np.random.default_rng(seed)
    win, pos = (a.ravel() for a in np.meshgrid(np.arange(N_WIN), np.arange(SEQ), indexing="ij"))
    x = rng.standard_normal((len(win), D_IN)).astype(np.float32)
    order = rng.permutation(len(win))
    x, win, pos = x[order], win[order].astype(np.int32), pos[order].astype(np.int32)
    if missing is not None:
        keep = ~((win == missing[0]) & (pos == missing[1]))
        x, win, pos = x[keep], win[keep], pos[keep]
    return x, win, pos


def batches(x: np.ndarray, win: np.ndarray, pos: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, ...]]:
    for lo in range(0, len(x), rows):
        yield x[lo : lo + rows], win[lo : lo + rows], pos[lo : lo + rows]


class Chars:
    """A tokenizer whose token t decodes to chr(65 + t)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + int(t)) for t in ids)


@pytest.mark.parametrize("k", [None, 3])
def test_context_activations_match_brute_force(k: int | None) -> None:
    sae = NumpySAE(k=k)
    x, win, pos = traced(missing=(2, 4))
    span = 3
    vals, wins, poss, _, _ = feat.top_activations(sae.encode, batches(x, win, pos, 10), D_SAE, K)
    grid = feat.context_grid(vals, wins, poss, SEQ, span)
    token_acts = feat.activations_at(sae.encode, batches(x, win, pos, 13), *grid)
    assert token_acts.shape == (D_SAE, K, 2 * span + 1) and token_acts.dtype == np.float32

    ref_acts = sae.numpy(x)  # [rows, d_sae]
    where = {(int(w), int(p)): r for r, (w, p) in enumerate(zip(win, pos, strict=True))}
    ids = np.arange(N_WIN * SEQ).reshape(N_WIN, SEQ) % 26
    ctx = feat.contexts(Chars(), ids, vals, wins, poss, span, token_acts)
    checked = edges = 0
    for i, rows in enumerate(ctx):
        shown = [j for j in range(K) if np.isfinite(vals[i, j]) and vals[i, j] > 0]
        assert len(rows) == len(shown)
        for j, c in zip(shown, rows, strict=True):
            w, p = int(wins[i, j]), int(poss[i, j])
            lo, hi = max(0, p - span), min(SEQ, p + span + 1)  # clipped to the window
            edges += (lo, hi) != (p - span, p + span + 1)
            assert c["tokens"] == [chr(65 + int(t)) for t in ids[w, lo:hi]]
            assert c["left"] + c["token"] + c["right"] == "".join(c["tokens"])
            assert len(c["activations"]) == hi - lo and c["center"] == p - lo
            assert c["tokens"][c["center"]] == c["token"]
            # The centre reproduces the stored top activation.
            assert abs(c["activations"][c["center"]] - c["activation"]) <= TOL * max(1.0, c["activation"])
            for q, got in zip(range(lo, hi), c["activations"], strict=True):
                r = where.get((w, q))
                if r is None:  # the token left out of the trace
                    assert np.isnan(got) and (w, q) == (2, 4)
                else:
                    assert abs(got - ref_acts[r, i]) <= TOL * max(1.0, abs(ref_acts[r, i]))
                checked += 1
    assert checked > 50 and edges > 0  # the case covers real contexts and clipped ones


def test_unshown_contexts_and_clipped_slots_are_not_computed() -> None:
    vals = np.array([[2.0, -np.inf], [0.0, 1.0]], dtype=np.float32)
    wins = np.array([[0, 0], [1, 1]])
    poss = np.array([[0, 0], [3, 4]])
    lat, win, pos = feat.context_grid(vals, wins, poss, seq_len=5, span=2)
    assert pos[0, 0].tolist() == [-1, -1, 0, 1, 2]  # clipped at the window's start
    assert pos[1, 1].tolist() == [2, 3, 4, -1, -1]  # and at its end
    assert (pos[0, 1] == -1).all() and (pos[1, 0] == -1).all()  # contexts `contexts` drops
    assert (lat[1] == 1).all() and (win[1] == 1).all()
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x[:, :2] * 10

    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    batch = (x, np.zeros(5, np.int32), np.arange(5, dtype=np.int32))  # window 0 only
    got = feat.activations_at(encode, [batch, (x[:0], batch[1][:0], batch[2][:0])], lat, win, pos)
    np.testing.assert_array_equal(got[0, 0], [np.nan, np.nan, 0.0, 20.0, 40.0])
    assert np.isnan(got[1]).all()  # window 1 was never traced
    assert calls == [5]  # a batch with nothing wanted is not encoded


def test_contexts_without_token_activations_keep_the_old_fields() -> None:
    vals = np.array([[1.5]], dtype=np.float32)
    ctx = feat.contexts(Chars(), np.array([[0, 1, 2, 3]]), vals, np.array([[0]]), np.array([[3]]), 2)
    c = ctx[0][0]
    assert (c["left"], c["token"], c["right"], c["activation"]) == ("BC", "D", "", 1.5)
    assert c["tokens"] == ["B", "C", "D"] and c["center"] == 2 and np.isnan(c["activations"]).all()


def variant_case(seed: int = 2) -> tuple[NumpySAE, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Full-precision rows and a "quantized" copy: the same tokens, the vectors rounded and shifted."""
    sae = NumpySAE(seed, k=4)
    x, win, pos = traced(seed)
    xq = (np.round(x * 4) / 4 + 0.3).astype(np.float32)
    return sae, (x, win, pos), (xq, win, pos)


def test_variant_fate_matches_corrcoef_and_density() -> None:
    sae, fp, var = variant_case()
    # Latent 0 never fires in either; latent 1 fires on both everywhere (a large mean beside a small spread).
    sae.W[:, 0], sae.b_enc[0] = 0.0, -1.0
    sae.W[:, 1], sae.b_enc[1] = 0.5, 1000.0
    sae.k = None
    density, corr, n = feat.variant_fate(
        sae.encode, batches(*fp, 11), batches(*var, 7), D_SAE, block_rows=D_SAE * 5
    )  # different batch boundaries on each side, several merge blocks per batch
    a, b = (sae.numpy(x).astype(np.float32).astype(np.float64) for x in (fp[0], var[0]))  # what it sees
    assert n == len(a)
    np.testing.assert_allclose(density, (b > 0).mean(0), rtol=0, atol=1e-12)
    for i in range(D_SAE):
        if a[:, i].std() == 0 or b[:, i].std() == 0:
            assert np.isnan(corr[i])
        else:
            assert abs(corr[i] - np.corrcoef(a[:, i], b[:, i])[0, 1]) <= TOL, i
    assert np.isnan(corr[0]) and density[0] == 0  # never fires: undefined, not 0
    assert abs(corr[1] - np.corrcoef(a[:, 1], b[:, 1])[0, 1]) <= TOL and density[1] == 1
    assert np.isfinite(corr).sum() >= D_SAE // 2


def test_variant_fate_on_identical_activations_is_one() -> None:
    sae, fp, _ = variant_case()
    density, corr, _ = feat.variant_fate(sae.encode, batches(*fp, 16), batches(*fp, 16), D_SAE)
    fired = (sae.numpy(fp[0]) > 0).any(0)
    np.testing.assert_allclose(corr[fired], 1.0, atol=TOL)
    assert np.isnan(corr[~fired]).all()


def test_variant_fate_refuses_misaligned_rows() -> None:
    sae, fp, var = variant_case()
    swapped = (var[0], var[1].copy(), var[2].copy())
    swapped[2][[5, 6]] = swapped[2][[6, 5]]
    with pytest.raises(feat.Misaligned, match="row 5: full precision is"):
        feat.variant_fate(sae.encode, batches(*fp, 4), batches(*swapped, 4), D_SAE)
    short = tuple(a[:-3] for a in var)
    with pytest.raises(feat.Misaligned, match=f"full precision has {len(fp[0])} rows, the variant {len(fp[0]) - 3}"):
        feat.variant_fate(sae.encode, batches(*fp, 10), batches(*short, 10), D_SAE)


def test_table_has_the_new_fields_and_fate_columns() -> None:
    vals = np.array([[1.5], [0.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3]])
    acts = np.full((2, 1, 5), np.nan, np.float32)
    acts[0, 0, 2:4] = [1.5, 0.25]
    ctx = feat.contexts(Chars(), ids, vals, np.zeros((2, 1), int), np.array([[1], [0]]), 2, acts)
    fate = {"int8": (np.array([0.5, 0.0]), np.array([0.9, np.nan]))}
    t = feat.table(np.array([0.5, 0.0]), np.array([1.0, 0.0]), ctx, None, None, fate)
    assert t.column_names == ["feature", "density", "mean_activation", "top_contexts", "density[int8]", "corr[int8]"]
    assert str(t.schema.field("corr[int8]").type) == "double"
    c = t.column("top_contexts").to_pylist()[0][0]
    assert c["tokens"] == ["A", "B", "C", "D"] and c["center"] == 1
    assert c["activations"][1] == c["activation"] == 1.5 and np.isnan(c["activations"][0])
