"""microscope.attribution_eval and its readers against independent references: gradients and logit gaps
recomputed with plain autograd and forward passes, completeness of integrated gradients on a digits CNN,
a tiny GPT-2 and a tiny BERT, and the layer-share join against hand-computed percentages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from microscope import attribution_eval as ae
from microscope.results import attribution as ra
from schemas.config import AttributionConfig
from schemas.details.attribution import AttributionDetails
from schemas.records import StageRecord, StageStatus


def _cfg(**overrides: object) -> AttributionConfig:
    return AttributionConfig(
        **({"samples": 6, "ig_steps": 256, "smoothgrad_samples": 4, "layer_steps": 16} | overrides)
    )


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A small CNN trained for a few full-batch steps on scikit-learn's digits (8×8, scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    y = d.target.astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval(), x[1200:1400], y[1200:1400]


def _blocks(model: nn.Sequential) -> dict[str, nn.Module]:
    return {"0": model[0], "4": model[4], "6": model[6]}


def test_images_completeness_maps_and_details(digits: tuple[nn.Module, np.ndarray, np.ndarray]) -> None:
    model, x, y = digits
    r = ae.evaluate_images(model, x, y, _cfg(), seed=3, blocks=_blocks(model))
    idx = np.asarray(r["samples"])
    assert len(idx) == 6 and len(set(idx)) == 6 and (np.diff(idx) > 0).all()
    xs = torch.from_numpy(x[idx])
    with torch.no_grad():
        logits = model(xs)
        base = model(torch.zeros_like(xs))
    pred = logits.argmax(1)
    gap = (logits - base).gather(1, pred[:, None]).squeeze(1).numpy()
    got = r["per_sample"]
    assert [s["predicted"] for s in got] == pred.tolist()
    assert [s["label"] for s in got] == y[idx].tolist()
    np.testing.assert_allclose([s["gap"] for s in got], gap, rtol=1e-4, atol=1e-5)
    rel = np.array([s["relative_delta"] for s in got])
    assert rel.max() < 0.01  # Gauss-Legendre with 256 nodes: IG sums to the logit gap within 1%
    np.testing.assert_allclose(rel, np.abs([s["delta"] for s in got]) / np.abs(gap), rtol=1e-4)
    assert r["figures"]["completeness_max_rel"] == pytest.approx(rel.max())
    # |IG| summed over the image bounds |Σ IG| = |gap + delta| from above
    ig_abs = np.array([np.sum(s["maps"]["integrated_gradients"]) for s in got])
    assert (ig_abs >= np.abs(gap) * (1 - 0.01) - 1e-6).all()
    # saliency: channel-summed |∂F_pred/∂x| by plain autograd (8×8 maps are not pooled)
    xg = xs.clone().requires_grad_()
    model(xg).gather(1, pred[:, None]).sum().backward()
    ref = xg.grad.abs().sum(1).numpy()
    np.testing.assert_allclose(np.array([s["maps"]["saliency"] for s in got]), ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.array([s["maps"]["input"] for s in got]), x[idx], rtol=1e-4, atol=1e-9)
    # block shares, the randomisation check, the settings used
    assert sum(r["layer_shares"].values()) == pytest.approx(1.0)
    assert set(r["layer_shares"]) == {"0", "4", "6"}
    assert r["figures"]["top_block_share"] == pytest.approx(max(r["layer_shares"].values()))
    assert r["randomisation"]["method"] == "saliency"
    assert r["figures"]["randomisation_spearman"] == pytest.approx(r["randomisation"]["spearman"])
    assert r["methods"]["baseline"] == "zeros"
    assert r["methods"]["smoothgrad_sigma"] == pytest.approx(0.15 * float(xs.max() - xs.min()))
    assert all("." not in k and isinstance(v, float) for k, v in r["figures"].items())
    json.dumps(r, allow_nan=False)
    details = AttributionDetails(prefix="abc/attribution/123", variant="fp", **ae.small(r))
    dumped = json.dumps(details.model_dump(mode="json"))
    assert all("maps" not in s for s in details.per_sample) and len(dumped) < 8000
    # the same seed picks the same samples
    again = ae.evaluate_images(model, x, y, _cfg(samples=6, ig_steps=8, randomisation=False), seed=3, blocks={})
    assert again["samples"] == r["samples"]
    assert again["randomisation"] is None and "randomisation_spearman" in again["undefined"]
    assert again["layer_shares"] == {} and "top_block_share" not in again["figures"]


def test_images_mean_baseline_is_the_whole_sets_mean(digits: tuple[nn.Module, np.ndarray, np.ndarray]) -> None:
    model, x, y = digits
    r = ae.evaluate_images(model, x, y, _cfg(baseline="mean", samples=3, randomisation=False), seed=1, blocks={})
    xs = torch.from_numpy(x[r["samples"]])
    with torch.no_grad():
        logits, base = model(xs), model(torch.from_numpy(x.mean(0, keepdims=True)))
    pred = logits.argmax(1)
    gap = (logits - base)[torch.arange(3), pred].numpy()
    np.testing.assert_allclose([s["gap"] for s in r["per_sample"]], gap, rtol=1e-4, atol=1e-5)
    assert r["methods"]["baseline"].startswith("mean image")


def test_large_maps_are_mean_pooled_to_64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32, 3)).eval()
    x = np.random.default_rng(0).random((3, 3, 128, 128)).astype(np.float32)
    ac = _cfg(samples=2, ig_steps=4, smoothgrad_samples=1, randomisation=False)
    r = ae.evaluate_images(model, x, np.zeros(3, dtype=np.int64), ac, seed=0, blocks={})
    xs = torch.from_numpy(x[r["samples"]]).requires_grad_()
    out = model(xs)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    full = xs.grad.abs().sum(1).numpy()  # [2, 128, 128]
    ref = full.reshape(2, 64, 2, 64, 2).mean((2, 4))  # 2×2 block means
    got = np.array([s["maps"]["saliency"] for s in r["per_sample"]])
    assert got.shape == (2, 64, 64)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-9)
    assert np.array(r["per_sample"][0]["maps"]["input"]).shape == (3, 64, 64)


def test_impossible_input_is_a_value_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="no samples"):
        ae.evaluate_images(model, np.zeros((0, 1, 2, 2), np.float32), np.zeros(0), _cfg(), 0, {})
    with pytest.raises(ValueError, match="logits"):
        ae.evaluate_images(nn.Identity(), np.zeros((2, 1, 2, 2), np.float32), np.zeros(2), _cfg(), 0, {})


# ---- text ----------------------------------------------------------------------------------------


class _Tok:
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"Ġw{i}" for i in ids]


def _ids(n: int = 6, t: int = 20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 100, (n, t))


def test_causal_lm_tokens_sum_to_the_logit_gap() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = _ids()
    blocks = {f"transformer.h.{i}": model.transformer.h[i] for i in range(2)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = ae.evaluate_text(model, ids, _cfg(samples=3, ig_steps=128, max_tokens=12), 0, True, blocks, _Tok())
    assert r["kind"] == "causal"
    tok = torch.from_numpy(ids[r["samples"], :12])
    with torch.no_grad():
        last = model(input_ids=tok).logits[:, -1, :]
        zero = model(inputs_embeds=torch.zeros(3, 12, 32)).logits[:, -1, :]
    pred = last.argmax(-1)
    gap = (last - zero)[torch.arange(3), pred].numpy()
    sums = np.array([sum(s["scores"]) for s in r["per_sample"]])
    np.testing.assert_allclose(sums, gap, rtol=1e-3, atol=1e-4)  # completeness, from scores rounded to 5 digits
    assert [s["predicted"] for s in r["per_sample"]] == pred.tolist()
    s0 = r["per_sample"][0]
    assert s0["tokens"] == [f"Ġw{i}" for i in tok[0].tolist()] and len(s0["scores"]) == 12
    assert s0["next_token"] == f"Ġw{ids[r['samples'][0], 12]}"
    assert sum(r["layer_shares"].values()) == pytest.approx(1.0)
    # the randomisation check: the last block re-initialised in a copy; Spearman recomputed with SciPy
    from scipy.stats import spearmanr

    rnd = r["randomisation"]
    assert rnd["randomised"] == "transformer.h.1" and rnd["method"] == "integrated_gradients"
    assert r["figures"]["randomisation_spearman"] == rnd["spearman"] and rnd["passed"] == (rnd["spearman"] < 0.5)
    assert -1.0 <= rnd["spearman"] <= 1.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    again = ae.evaluate_text(model, ids, _cfg(samples=3, ig_steps=128, max_tokens=12), 0, True, blocks, _Tok())
    assert again["randomisation"]["spearman"] == rnd["spearman"]  # seeded
    same = spearmanr(np.abs(r["per_sample"][0]["scores"]), np.abs(again["per_sample"][0]["scores"]))[0]
    assert same == pytest.approx(1.0)  # unrandomised: identical maps correlate perfectly, unlike the check's
    json.dumps(r, allow_nan=False)
    AttributionDetails(prefix="p", variant="int8", **ae.small(r))
    assert len(ae.small(r)["per_sample"][0]["top_tokens"]) == ae.TOP_TOKENS


def test_encoder_tokens_sum_to_the_retrieval_score_gap() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(cfg).eval()
    ids = _ids()
    blocks = {f"encoder.layer.{i}": model.encoder.layer[i] for i in range(2)}
    r = ae.evaluate_text(model, ids, _cfg(samples=3, ig_steps=128, max_tokens=10), 0, False, blocks, None)
    assert r["kind"] == "encoder"
    tok = torch.from_numpy(ids[r["samples"], :10])
    with torch.no_grad():
        q = model(input_ids=tok).last_hidden_state.mean(1)
        b = model(inputs_embeds=torch.zeros(3, 10, 32)).last_hidden_state.mean(1)
    gap = 1.0 - nn.functional.cosine_similarity(b, q, dim=-1).numpy()  # F(x) = cos(q, q) = 1
    sums = np.array([sum(s["scores"]) for s in r["per_sample"]])
    np.testing.assert_allclose(sums, gap, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose([s["score"] for s in r["per_sample"]], 1.0, atol=1e-5)
    assert r["per_sample"][0]["tokens"] == [str(i) for i in tok[0].tolist()]
    assert sum(r["layer_shares"].values()) == pytest.approx(1.0)
    AttributionDetails(prefix="p", variant="fp", **ae.small(r))
    with pytest.raises(ValueError, match="logits"):
        ae.evaluate_text(model, ids, _cfg(samples=1), 0, True, {}, None)


# ---- readers ---------------------------------------------------------------------------------------


def _record(shares: dict[str, float]) -> StageRecord:
    return StageRecord(
        stage="attribution", status=StageStatus.completed, details={"kind": "causal", "layer_shares": shares}
    )


def test_layer_shares_join_by_prefix_and_by_block_index() -> None:
    nan = math.nan
    rows = [
        {"name": "transformer.wte.weight", "layer": -1, "fisher_trace": 10.0, "hessian_trace": 5.0},
        {"name": "transformer.h.0.attn.c_attn.weight", "layer": 0, "fisher_trace": 1.0, "hessian_trace": 2.0},
        {"name": "transformer.h.0.mlp.c_fc.weight", "layer": 0, "fisher_trace": 3.0, "hessian_trace": nan},
        {"name": "transformer.h.1.mlp.c_fc.weight", "layer": 1, "fisher_trace": 4.0, "hessian_trace": 6.0},
    ]
    # by prefix: block 0 has Fisher 1 + 3 = 4, Hessian 2 (NaN left out); block 1 Fisher 4, Hessian 6
    df = ra.layer_shares_table(_record({"transformer.h.0": 0.25, "transformer.h.1": 0.75}), rows).set_index("block")
    np.testing.assert_allclose(df["attribution_pct"], [25.0, 75.0])
    np.testing.assert_allclose(df["fisher_trace"], [4.0, 4.0])
    np.testing.assert_allclose(df["fisher_pct"], [50.0, 50.0])
    np.testing.assert_allclose(df["hessian_trace"], [2.0, 6.0])
    np.testing.assert_allclose(df["hessian_pct"], [25.0, 75.0])
    assert list(df["parameters"]) == [2, 1] and set(df["matched_by"]) == {"parameter prefix"}
    # a hook-style name ending in the block index matches through `layer`
    df = ra.layer_shares_table(_record({"blocks.1": 0.4, "blocks.0": 0.6}), rows).set_index("block")
    np.testing.assert_allclose(df.loc["blocks.1", ["attribution_pct", "fisher_pct", "hessian_pct"]], [40.0, 50.0, 75.0])
    assert set(df["matched_by"]) == {"block index"}
    # no sensitivity rows: the traces are NaN and the table says why
    df = ra.layer_shares_table(_record({"features.0": 1.0}), [])
    assert math.isnan(df["fisher_trace"][0]) and "metrics.sensitivity" in df.attrs["missing"]


def test_overview_reads_full_precision_and_variants() -> None:
    fp = _record({"b.0": 1.0})
    fp.details["figures"] = {"completeness_max_rel": 0.001}
    q = _record({"b.0": 1.0})
    failed = StageRecord(stage="attribution", status=StageStatus.failed, error="boom")
    ov = ra.attribution_overview(fp, {"int8": {"attribution": q}, "nf4": {"attribution": failed}})
    assert list(ov["records"]) == ["fp", "int8"] and ov["kind"] == "causal"
    assert ov["variants"][0] == {"variant": "fp", "completeness_max_rel": 0.001}
    assert ra.attribution_overview(None, {"int8": {"attribution": q}}) is None
