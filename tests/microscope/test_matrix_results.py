"""The Matrix explorer's numbers (`microscope.results.matrix`) against independent references: pooling
against a NumPy reshape-mean/max, the histogram against np.histogram, the MP edges against the closed form,
the MP density against quadrature and the eigenvalues of a Gaussian matrix, the power-law line against
the recorded fit, the quantization error against a direct NumPy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from microscope.results import matrix as mx
from microscope.spectra import matrix_stats, mp_spikes, power_law_fit


def test_mean_pooling_is_a_block_mean() -> None:
    w = np.random.default_rng(0).standard_normal((96, 64))
    grid = mx.pooled_grid(w, cells=32, how="mean")  # blocks of 3 × 2
    ref = w.reshape(32, 3, 32, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(grid, ref, rtol=1e-12, atol=1e-14)


def test_maxabs_pooling_is_a_block_max_of_magnitudes() -> None:
    w = np.random.default_rng(1).standard_normal((40, 90))
    grid = mx.pooled_grid(w, cells=10, how="maxabs")
    np.testing.assert_array_equal(grid, np.abs(w).reshape(10, 4, 10, 9).max(axis=(1, 3)))


def test_uneven_pooling_matches_array_split_blocks() -> None:
    w = np.random.default_rng(2).standard_normal((50, 7))
    grid = mx.pooled_grid(w, cells=8, how="mean")  # rows: 8 blocks of 7 or 6; cols: 7 blocks of 1
    rows = np.array_split(np.arange(50), 8)
    ref = np.array([[w[r, c].mean() for c in range(7)] for r in rows])
    assert grid.shape == (8, 7)
    np.testing.assert_allclose(grid, ref, rtol=1e-12)


def test_an_unknown_pooling_is_refused() -> None:
    with pytest.raises(mx.InputError, match="pooling 'median'"):
        mx.pooled_grid(np.ones((4, 4)), how="median")


def test_histogram_equals_numpy() -> None:
    w = np.random.default_rng(3).standard_normal((64, 32))
    h = mx.weight_histogram(w, bins=40)
    counts, edges = np.histogram(w, bins=40)
    np.testing.assert_array_equal(h["count"], counts)
    np.testing.assert_allclose(h["lo"], edges[:-1], rtol=0, atol=0)
    assert int(h["count"].sum()) == w.size


@pytest.mark.parametrize("shape", [(1000, 250), (250, 1000), (300, 300)])
def test_mp_edges_are_the_closed_form(shape: tuple[int, int]) -> None:
    var = 0.37
    n, m = max(shape), min(shape)
    lo, hi = mx.mp_edges(var, *shape)
    assert lo == pytest.approx(var * (1 - math.sqrt(m / n)) ** 2, rel=1e-14, abs=1e-15)
    assert hi == pytest.approx(var * (1 + math.sqrt(m / n)) ** 2, rel=1e-14)


@pytest.mark.parametrize("shape", [(1000, 250), (512, 400), (300, 300)])
def test_mp_density_integrates_to_one(shape: tuple[int, int]) -> None:
    var = 2.5
    lo, hi = mx.mp_edges(var, *shape)
    total, err = integrate.quad(lambda x: float(mx.mp_density(np.array([x]), var, *shape)[0]), lo, hi, limit=200)
    assert total == pytest.approx(1.0, abs=1e-3), err  # a square matrix's density diverges at 0: quad's tolerance


def test_mp_density_matches_a_gaussian_matrix() -> None:
    """Eigenvalues of WᵀW/N for W (N × M) of i.i.d. N(0, σ²) entries follow MP: KS distance to its CDF < 0.03."""
    n, m, sigma = 1200, 400, 0.5
    w = np.random.default_rng(4).standard_normal((n, m)) * sigma
    evals = np.linalg.eigvalsh(w.T @ w / n)
    lo, hi = mx.mp_edges(sigma**2, n, m)
    xs = np.linspace(lo, hi, 4001)
    pdf = mx.mp_density(xs, sigma**2, n, m)
    cdf = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(xs))])
    ks = stats.kstest(evals, lambda x: np.interp(x, xs, cdf / cdf[-1])).statistic
    assert ks < 0.03, ks
    assert evals.max() == pytest.approx(hi, rel=0.05) and evals.min() == pytest.approx(lo, rel=0.1)


def _row(w: np.ndarray) -> dict:
    st = matrix_stats(w)
    sv = st["singular_values"]
    return {**st, **power_law_fit(sv), "mp_spikes": mp_spikes(sv, tuple(st["shape"]), frobenius=st["frobenius"])}


def test_spectrum_counts_the_recorded_spikes_and_rescales_the_fit() -> None:
    rng = np.random.default_rng(5)
    n, m = 600, 200
    w = rng.standard_normal((n, m)) * 0.1
    u, v = rng.standard_normal(n), rng.standard_normal(m)
    w += 3.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)) * math.sqrt(n) * 0.1  # one planted spike
    row = _row(w)
    sp = mx.matrix_spectrum(row["singular_values"], row)
    assert len(sp["spikes"]) == row["mp_spikes"] >= 1
    var = float(np.mean(w**2))
    assert sp["var"] == pytest.approx(var, rel=1e-10)
    assert sp["edges"][1] == pytest.approx(var * (1 + math.sqrt(m / n)) ** 2, rel=1e-10)
    evals = np.linalg.eigvalsh(w.T @ w / n)  # the ESD's eigenvalues: σ²/N
    assert sp["spikes"][0] == pytest.approx(evals.max(), rel=1e-8)
    assert sp["xmin"] == pytest.approx(row["xmin"] / n, rel=1e-12)
    # the ESD against np.histogram, on the recorded singular values' σ²/N (the same numbers as eigvalsh's
    # to rounding; the histogram's end bins are exact at min and max, so it is drawn from the ESD's own values)
    lam = np.sort(np.asarray(row["singular_values"], dtype=np.float64) ** 2 / n)
    np.testing.assert_allclose(lam, evals, rtol=0, atol=1e-10 * evals.max())
    edges = np.logspace(np.log10(lam.min()), np.log10(lam.max()), 61)
    counts, _ = np.histogram(lam, bins=edges)
    dens = counts / (lam.size * np.diff(edges))
    np.testing.assert_allclose(sp["esd"]["density"], dens[dens > 0], rtol=1e-6)
    np.testing.assert_allclose(sp["esd"]["lambda"], np.sqrt(edges[:-1] * edges[1:])[dens > 0], rtol=1e-6)


def test_power_law_line_has_the_recorded_slope_and_mass() -> None:
    """The line's log-log slope is −α, and its integral over [xmin, ∞) is the tail's share of eigenvalues."""
    rng = np.random.default_rng(6)
    sv = np.sqrt((rng.pareto(2.5, 400) + 1.0) * 0.01)  # a heavy-tailed spectrum: a power law with α ≈ 3.5
    fit = power_law_fit(sv)
    alpha, xmin, n_tail = fit["alpha"], fit["xmin"], fit["n_tail"]
    line = mx.power_law_line(alpha, xmin, float((sv**2).max()), n_tail, 400)
    slope = np.polyfit(np.log(line["lambda"]), np.log(line["density"]), 1)[0]
    assert slope == pytest.approx(-alpha, rel=1e-10)
    share = n_tail / 400
    mass, _ = integrate.quad(lambda x: share * (alpha - 1) / xmin * (x / xmin) ** (-alpha), xmin, np.inf)
    assert mass == pytest.approx(share, rel=1e-6)
    assert line["density"].iloc[0] == pytest.approx(share * (alpha - 1) / xmin, rel=1e-12)


def test_quant_error_of_torch_int8_equals_numpy() -> None:
    """The torch-int8 variant's saved tensors (the real Int8Linear), dequantized: the error equals NumPy's
    per-row symmetric int8 round trip."""
    import torch

    from microscope.native_int8 import Int8Linear

    w = np.random.default_rng(7).standard_normal((48, 80)).astype(np.float32)
    mod = Int8Linear(torch.from_numpy(w), None)
    saved = {f"blk.lin.{k}": v.numpy() for k, v in mod.state_dict().items()}
    wq, how = mx.dequantized_weight(saved, "blk.lin.weight")
    w64 = w.astype(np.float64)
    scale = np.abs(w64).max(axis=1, keepdims=True) / 127.0
    ref_q = np.clip(np.round(w64 / scale), -127, 127) * scale
    expected = np.linalg.norm(ref_q - w64) / np.linalg.norm(w64)
    assert "int8" in how
    assert mx.relative_error(w64, wq) == pytest.approx(expected, rel=1e-5)  # fp32 scales: ~1e-7 relative


def test_quant_error_of_a_float_and_an_llm_int8_variant() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 24))
    pruned = np.where(np.abs(w) < 0.5, 0.0, w).astype(np.float32)
    wq, how = mx.dequantized_weight({"a.weight": pruned}, "a.weight")
    assert how == "saved variant"
    expected = math.sqrt(float((w[np.abs(w) < 0.5] ** 2).sum())) / math.sqrt(float((w**2).sum()))
    assert mx.relative_error(w, wq) == pytest.approx(expected, rel=1e-6)  # the float32 copy: ~1e-7
    scb = np.abs(w).max(axis=1).astype(np.float32)  # LLM.int8: int8 rows and their absmax
    q8 = np.round(w / scb[:, None] * 127).astype(np.int8)
    wq, how = mx.dequantized_weight({"a.weight": q8, "a.SCB": scb}, "a.weight")
    np.testing.assert_allclose(wq, q8 * scb.astype(np.float64)[:, None] / 127, rtol=1e-12)
    assert mx.dequantized_weight({"a.weight": np.zeros((2, 2), np.uint8)}, "a.weight") is None  # packed 4-bit


NF4 = [  # the NormalFloat4 code (Dettmers et al. 2023, QLoRA, appendix E)
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_quant_error_of_an_nf4_variant_equals_numpy() -> None:
    """A 4-bit weight saved as bitsandbytes saves it (packed `weight` + `weight.absmax`, `weight.quant_map`,
    `weight.quant_state.*`), dequantized: equal to NumPy's blockwise NF4 (blocks of 64, absmax scale,
    nearest code) within 1e-6 (fp32 arithmetic)."""
    import bitsandbytes as bnb
    import torch

    w = np.random.default_rng(9).standard_normal((96, 32)).astype(np.float32)
    p = bnb.nn.Params4bit(
        torch.from_numpy(w.copy()), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=False
    )
    p = p._quantize("cpu")
    saved = {"m.weight": p.data.numpy()} | {f"m.weight.{k}": v.numpy() for k, v in p.quant_state.as_dict(True).items()}
    wq, how = mx.dequantized_weight(saved, "m.weight")
    blocks = w.astype(np.float64).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    code = np.array(NF4)
    ref = code[np.abs(blocks[..., None] / absmax[..., None] - code).argmin(-1)] * absmax
    assert "4-bit" in how and wq.shape == w.shape
    np.testing.assert_allclose(wq, ref.reshape(w.shape), rtol=0, atol=1e-6)
    assert mx.relative_error(w, wq) == pytest.approx(
        np.linalg.norm(ref.reshape(w.shape) - w) / np.linalg.norm(w), rel=1e-5
    )


def test_matrix_kinds() -> None:
    kinds = {
        "transformer.h.0.attn.c_attn.weight": "attention.qkv",
        "transformer.h.0.attn.c_proj.weight": "attention.out",
        "transformer.h.0.mlp.c_fc.weight": "mlp",
        "transformer.h.0.mlp.c_proj.weight": "mlp",
        "transformer.wte.weight": "embedding",
        "lm_head.weight": "head",
        "model.layers.3.self_attn.q_proj.weight": "attention.q",
        "model.layers.3.self_attn.k_proj.weight": "attention.k",
        "model.layers.3.self_attn.v_proj.weight": "attention.v",
        "model.layers.3.self_attn.o_proj.weight": "attention.out",
        "model.layers.3.mlp.down_proj.weight": "mlp",
        "encoder.layer.0.attention.self.query.weight": "attention.q",
        "encoder.layer.0.attention.output.dense.weight": "attention.out",
        "encoder.layer.0.output.dense.weight": "mlp",
        "conv1.weight": "other",
    }
    assert {n: mx.matrix_kind(n) for n in kinds} == kinds


def test_closest_names() -> None:
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight", "lm_head.weight"]
    assert mx.closest_names("transformer.h.1.attn.c_atn.weight", names)[0] == names[1]
