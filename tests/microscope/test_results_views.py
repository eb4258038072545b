"""The results API behind the viewer's Architecture, Quantization, Robustness and Evolution pages, on real
finished audits (the tiny GPT-2 run of `finished_audits`, the digits CNN of `finished_vision`). Every
figure is checked against where it came from: the checkpoint's tensors, the record, or NumPy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microscope import results
from microscope.store import open_store
from tests.conftest import FINISHED_RUN


@pytest.fixture(scope="module")
def gpt2(finished_audits: dict[str, dict]):
    store = open_store(finished_audits["step1"]["store_uri"])
    return store, results.load_audit(store, finished_audits["step1"]["audit_id"]), finished_audits


@pytest.fixture(scope="module")
def vision(finished_vision: dict):
    store = open_store(finished_vision["store_uri"])
    return store, results.load_audit(store, finished_vision["audit_id"]), finished_vision


def test_module_table_counts_match_the_checkpoint(gpt2, tiny_gpt2_dir: Path) -> None:
    from safetensors.numpy import load_file

    _, rec, _ = gpt2
    tensors = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    df = results.module_table(rec)
    assert list(df["name"]) == [m.name for m in rec.architecture.modules]
    checked = 0
    for name, params, parent, depth in zip(df["name"], df["params"], df["parent"], df["depth"], strict=True):
        in_file = sum(t.size for k, t in tensors.items() if k.startswith(name + "."))
        if in_file:  # a tied head has no tensor of its own in the file
            assert params == in_file, name
            checked += 1
        assert (parent == "") == (depth == 0) and (not parent or name.startswith(parent + "."))
    assert checked >= 4
    assert np.allclose(df["share"], df["params"] / rec.architecture.n_params)


def test_memory_table_from_the_weights(gpt2, tiny_gpt2_dir: Path) -> None:
    from safetensors.numpy import load_file

    _, rec, _ = gpt2
    tensors = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    mem = results.memory_table(rec).set_index("layer")
    for layer in (0, 1):
        weights = [t for k, t in tensors.items() if k.startswith(f"transformer.h.{layer}.") and t.ndim == 2]
        numel = sum(t.size for t in weights)
        assert mem.loc[layer, "bytes[fp]"] == 4 * numel  # float32
        # int8: one byte per weight plus an fp32 scale per row (the table's row = the tensor's first dim;
        # for GPT-2's Conv1D that is the input side, so allow 4 bytes × |in − out| per matrix)
        slack = sum(4 * abs(t.shape[0] - t.shape[1]) for t in weights)
        assert abs(mem.loc[layer, "bytes[int8]"] - sum(t.size + 4 * t.shape[1] for t in weights)) <= slack
    assert mem["bytes[int8]"].sum() < mem["bytes[fp]"].sum()
    assert mem.attrs["measured"]["int8"] == rec.variants["int8"]["quantize"].metrics["measured_bytes"]


def test_memory_table_of_a_cnn_counts_its_linear_layers_quantized(vision, digits_cnn) -> None:
    """A CNN has no blocks: every matrix is outside them. torch-int8 converts its Linear layers (fc and the
    head) and leaves the convolutions at fp32, so the estimate follows the measured variant, not fp."""
    from safetensors.numpy import load_file

    _, rec, _ = vision
    tensors = load_file(str(digits_cnn[0]))
    mem = results.memory_table(rec)
    convs = sum(t.size for k, t in tensors.items() if k.endswith(".weight") and t.ndim == 4)
    linears = [t for k, t in tensors.items() if k.endswith(".weight") and t.ndim == 2]
    # int8: one byte per weight plus an fp32 scale per output row; convolutions 4 bytes per weight
    expect = 4 * convs + sum(t.size + 4 * t.shape[0] for t in linears)
    assert mem["bytes[torch-int8]"].sum() == expect
    biases = sum(t.size for k, t in tensors.items() if k.endswith(".bias"))  # not in the table: fp32 in the variant
    assert mem.attrs["measured"]["torch-int8"] == expect + 4 * biases


def test_quantization_and_drift_tables_are_the_records(gpt2) -> None:
    _, rec, _ = gpt2
    q = results.quantization_table(rec)
    row = q.set_index("variant").loc["int8"]
    m = rec.variants["int8"]["quantize"].metrics
    for fig in ("kl_mean", "top1_agreement", "measured_bytes", "fp_bytes"):
        if fig in m:
            assert row[fig] == m[fig]
    assert row["memory_ratio"] == pytest.approx(m["measured_bytes"] / m["fp_bytes"], rel=1e-12)
    table = results.drift_table(rec)
    assert list(table["variant"]) == sorted(table["variant"])  # by variant, then layer
    assert set(table["variant"]) == set(rec.variants)
    drift = table[table["variant"] == "int8"]
    recorded = rec.variants["int8"]["quantize"].details["drift"]
    assert set(drift["hook"]) == set(recorded)
    for hook, cos, err in zip(drift["hook"], drift["cosine"], drift["rel_error"], strict=True):
        assert cos == recorded[hook]["cosine"] and err == recorded[hook]["rel_error"]
    assert list(drift["layer"]) == sorted(drift["layer"])


def test_projection_is_pca_on_one_basis_for_the_whole_run(gpt2) -> None:
    store, _, _ = gpt2
    layers = results.run_series(store, FINISHED_RUN, layers=True)
    proj = results.run_projection(layers, dims=3)
    feats = results.layer_features(layers)[proj.attrs["features"]].to_numpy(float)
    feats = np.where(np.isnan(feats), np.nanmean(feats, axis=0), feats)
    z = (feats - feats.mean(0)) / feats.std(0)
    evals, evecs = np.linalg.eigh(np.cov(z, rowvar=False, bias=True))  # NumPy's eigenvectors: the reference
    order = np.argsort(evals)[::-1]
    for i in range(3):
        ref = z @ evecs[:, order[i]]
        got = proj[f"pc{i + 1}"].to_numpy()
        assert min(np.abs(got - ref).max(), np.abs(got + ref).max()) < 1e-8  # equal up to sign
    assert np.allclose(proj.attrs["explained"], (evals[order] / evals.sum())[:3], atol=1e-10)
    # steps 1 and 2 are the same weights: nothing moves
    one, two = (proj[proj["step"] == s].set_index("name")[["pc1", "pc2", "pc3"]] for s in (1, 2))
    pd.testing.assert_frame_equal(one, two.loc[one.index])


def test_projection_moves_only_the_changed_matrix() -> None:
    rng = np.random.default_rng(0)
    base = pd.DataFrame(
        {
            "name": [f"m{i}" for i in range(6)],
            "layer": range(6),
            "role": "w",
            "rows": 32,
            "cols": 16,
            "frobenius": rng.uniform(1, 3, 6),
            "spectral_norm": rng.uniform(0.5, 1, 6),
            "effective_rank": rng.uniform(5, 15, 6),
            "stable_rank": rng.uniform(1, 5, 6),
            "alpha": rng.uniform(2, 6, 6),
            "sparsity": 0.0,
            "condition_number": rng.uniform(10, 100, 6),
        }
    )
    later = base.copy()
    later.loc[3, ["frobenius", "spectral_norm"]] *= 10  # one matrix scaled
    run = pd.concat([base.assign(step=0, audit_id="a"), later.assign(step=1, audit_id="b")], ignore_index=True)
    proj = results.run_projection(run, dims=2)
    a, b = (proj[proj["step"] == s].set_index("name")[["pc1", "pc2"]].to_numpy() for s in (0, 1))
    moved = np.linalg.norm(b - a, axis=1)
    assert moved[3] > 1.0 and np.allclose(np.delete(moved, 3), 0.0, atol=1e-12)
    assert "sparsity" not in proj.attrs["features"]  # constant: dropped, not divided by zero


def test_variant_fate_labels() -> None:
    assert results.variant_fate(0.01, 0.01, 0.95) == "survived"
    assert results.variant_fate(0.01, 0.02, 0.7) == "drifted"
    assert results.variant_fate(0.01, 0.0, math.nan) == "lost"
    assert results.variant_fate(0.01, 0.01, 0.1) == "lost"
    assert results.variant_fate(0.0, 0.0, math.nan) == "dead"


def test_robustness_views_are_the_records(vision) -> None:
    _, rec, raw = vision
    fp = raw["stages"]["robustness"]["details"]
    var = raw["variants"]["torch-int8"]["robustness"]["details"]
    curves = results.robustness_curves(rec)
    assert set(curves["variant"]) == {"fp", "torch-int8"}
    for name, d in (("fp", fp), ("torch-int8", var)):
        for attack in ("pgd", "fgsm", "noise"):
            got = curves[(curves["variant"] == name) & (curves["attack"] == attack)]
            assert list(got["eps"]) == d["curves"]["eps"] and list(got["accuracy"]) == d["curves"][attack]
    aa = results.autoattack_table(rec).set_index("variant")
    assert aa.loc["fp", "robust_accuracy"] == fp["autoattack"][0]["robust"]
    assert aa.loc["torch-int8", "delta_vs_fp"] == pytest.approx(
        var["autoattack"][0]["robust"] - fp["autoattack"][0]["robust"], abs=1e-12
    )
    assert aa.loc["fp", "attacks"] == "apgd-ce, apgd-t, fab-t, square" and aa.loc["fp", "samples"] == 32
    brittle = results.brittle_features(rec)  # the CNN has no SAE: says how to get the list
    assert brittle.empty and "SAE" in brittle.attrs["missing"]["robustness.features"]
    without = rec.model_copy(deep=True)
    without.stages.pop("robustness")
    assert "robustness to --stages" in results.robustness_curves(without).attrs["missing"]["robustness"]


def test_feature_fate_follows_the_stored_matches(gpt2) -> None:
    from microscope import feature_matching as fm

    store, rec1, raw = gpt2
    rec2 = results.load_audit(store, raw["step2"]["audit_id"])
    hook = "blocks.1.hook_resid_post"
    m = fm.load_matches(store, rec1.audit_id, rec2.audit_id, hook)
    assert m is not None  # made by step 2's audit when it ended
    t = m.features.to_pandas().set_index("feature_a")
    f = 3
    forward = results.feature_fate(store, rec1, hook, f)
    assert list(forward["step"]) == [1, 2] and forward.iloc[0]["label"] == "this audit"
    assert forward.iloc[1]["feature"] == t.loc[f, "feature_b"] and forward.iloc[1]["label"] == t.loc[f, "label"]
    assert forward.iloc[1]["cosine"] == pytest.approx(t.loc[f, "cosine"], abs=1e-7)
    back = results.feature_fate(store, rec2, hook, int(t.loc[f, "feature_b"]))
    assert list(back["step"]) == [1, 2] and back.iloc[0]["feature"] == f
    alone = results.feature_fate(store, results.load_audit(store, raw["partial"]["audit_id"]), hook, 0)
    assert alone.empty and "no other checkpoint" in alone.attrs["missing"]["run"]


def test_report_readers_are_the_records(gpt2) -> None:
    """The readers the HTML report renders from (they take stage records: the report renders mid-audit)."""
    _, rec, raw = gpt2
    raw = raw["step1"]
    ingest = raw["stages"]["ingest"]["details"]
    assert results.ingest_summary(rec.stages["ingest"])["model_digest"] == ingest["model_digest"]
    trace = raw["stages"]["trace"]["details"]
    rows, prefix = results.trace_points(rec.stages["trace"])
    assert (
        rows == sorted(trace["datasets"].values(), key=lambda r: (r["layer"], r["hook"])) and prefix == trace["prefix"]
    )
    assert results.trace_points(None) == ([], "")
    summaries = results.variant_summaries(rec.variants)
    assert [q["variant"] for q in summaries] == list(rec.variants)
    for q in summaries:
        quant = raw["variants"][q["variant"]]["quantize"]
        assert (q["produced"], q["metrics"]) == (quant["details"]["produced"], quant["metrics"])
        drift = {
            (p["hook"], p["cosine"], p["rel_error"])
            for p in results.drift_points({q["variant"]: rec.variants[q["variant"]]})
        }
        assert drift == {(h, d["cosine"], d["rel_error"]) for h, d in quant["details"]["drift"].items()}
    for s in results.sae_summaries(rec.saes):
        d = raw["saes"][s["hook"]]["details"]
        assert (s["failed"], s["architecture"], s["d_sae"]) == (False, d["architecture"], d["d_sae"])
        assert s["density"] == (d["density_hist"]["bins_log10"], d["density_hist"]["counts"])
    metrics = raw["stages"]["metrics"]["details"]
    w = results.weight_figures(rec.stages["metrics"])
    assert w is not None and w["weights"] == metrics["weights"]
    assert results.randomized_spectra(w["weights"])["count"] == sum(
        r.get("spectrum") == "randomized" for r in metrics["weights"]
    )
    for block in results.sensitivity_by_block(w["sensitivity"]):
        tensors = [s for s in metrics["sensitivity"] if s["layer"] == block["layer"]]
        assert block["fisher_trace"] == pytest.approx(sum(s["fisher_trace"] for s in tensors), rel=1e-12)
        assert block["grad_norm"] == pytest.approx(math.sqrt(sum(s["grad_norm"] ** 2 for s in tensors)), rel=1e-12)
    assert results.stage_verdict(rec.stages.get("gate")) is None  # these audits have no gate rules


def test_report_robustness_readers_are_the_records(vision) -> None:
    _, rec, raw = vision
    fp = raw["stages"]["robustness"]["details"]
    var = raw["variants"]["torch-int8"]["robustness"]["details"]
    o = results.robustness_overview(rec.stages["robustness"], rec.variants)
    assert o is not None and list(o["records"]) == ["fp", "torch-int8"] and o["eps"] == fp["curves"]["eps"]
    assert o["sweeps"]["pgd"]["torch-int8"] == list(zip(var["curves"]["eps"], var["curves"]["pgd"], strict=True))
    assert o["samples"] == 32 and o["autoattack"] == fp["autoattack"]
    s = results.robustness_summary("torch-int8", o["records"]["torch-int8"], rec.stages["robustness"])
    assert s["figures"]["clean_accuracy"] == var["curves"]["clean"][0]
    assert s["figures"]["noise"] == var["curves"]["noise"][-1]
    vs_fp = s["vs_fp"]
    assert vs_fp is not None and vs_fp["norm"] == var["autoattack"][0]["norm"]
    if "points" in vs_fp:  # else undefined on one side, with the record's reason
        want = 100 * (var["autoattack"][0]["robust"] - fp["autoattack"][0]["robust"])
        assert vs_fp["points"] == pytest.approx(want, abs=1e-9)
    assert results.robustness_overview(None, rec.variants) is None


def test_headline_compare_is_both_records_figures(gpt2) -> None:
    store, _, recs = gpt2
    a = results.load_audit(store, recs["step1"]["audit_id"])
    b = results.load_audit(store, recs["step2"]["audit_id"])
    df = results.headline_compare(a, b)
    ma, mb = recs["step1"]["stages"]["metrics"]["metrics"], recs["step2"]["stages"]["metrics"]["metrics"]
    rows = df[df["source"] == "metrics"].set_index("figure")
    assert set(rows.index) == set(ma) & set(mb)
    for k in rows.index:
        assert rows.loc[k, "A"] == ma[k] and rows.loc[k, "B"] == mb[k] and rows.loc[k, "B − A"] == mb[k] - ma[k]


def test_reliability_tables_are_the_records(vision) -> None:
    _, rec, raw = vision
    r = raw["stages"]["reliability"]
    table = results.reliability_table(rec).set_index("variant")
    assert table.loc["fp", "ece"] == r["metrics"]["ece"] and table.loc["fp", "samples"] == r["details"]["n"]
    bins = results.reliability_diagram(rec)
    fp_all = bins[(bins["variant"] == "fp") & (bins["view"] == "all samples")]
    assert list(fp_all["count"]) == r["details"]["calibration"]["diagram"]["count"]
    assert fp_all["count"].sum() == r["details"]["n"]
    corr = results.corruption_table(rec)
    fp_corr = corr[corr["variant"] == "fp"]
    assert len(fp_corr) == 16 * 5
    for row in fp_corr.itertuples():
        assert row.accuracy == r["details"]["corruptions"]["accuracy"][row.corruption][str(row.severity)]
    roc = results.roc_points(rec)
    noise = roc[(roc["ood_set"] == "uniform-noise") & (roc["score"] == "knn")]
    assert list(noise["fpr"]) == r["details"]["ood"]["uniform-noise"]["knn"]["roc"]["fpr"]


def test_pruned_variants_sparsity_curve_and_mask_view(gpt2, tiny_gpt2_dir: Path) -> None:
    """magnitude-30 and magnitude-50 of the tiny GPT-2: the exact sparsity, and the mask view equal to a global
    magnitude threshold computed with NumPy on the checkpoint's own tensors."""
    from safetensors.numpy import load_file

    store, rec, _ = gpt2
    table = results.pruning_table(rec).set_index("variant")
    assert list(table.index) == ["magnitude-30", "magnitude-50"] and set(table["method"]) == {"magnitude"}
    tensors = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    mats = results.pruned_matrices(rec, "magnitude-50")
    weights = {m: tensors[f"{m}.weight"] for m in mats}
    assert all(".h." in m for m in mats)  # the blocks' matrices; embeddings and the tied head never
    flat = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    for v, target in (("magnitude-30", 0.3), ("magnitude-50", 0.5)):
        assert table.loc[v, "target"] == target
        k = int(target * flat.size)
        assert table.loc[v, "sparsity"] == pytest.approx(k / flat.size, abs=1e-12)
        assert math.isfinite(table.loc[v, "kl_mean"])
    assert table.loc["magnitude-50", "kl_mean"] > table.loc["magnitude-30", "kl_mean"]  # more pruned, further off
    threshold = np.sort(flat, kind="stable")[int(0.5 * flat.size)]
    name = next(iter(mats))
    kept = (np.abs(weights[name]) >= threshold).astype(float).T  # Conv1D stores [in, out]
    grid = results.mask_grid(store, rec, "magnitude-50", name, cells=4)
    rows, cols = np.array_split(np.arange(kept.shape[0]), 4), np.array_split(np.arange(kept.shape[1]), 4)
    want = np.array([[kept[np.ix_(r, c)].mean() for c in cols] for r in rows])
    block = min(len(r) * len(c) for r in rows for c in cols)
    assert np.allclose(grid, want, atol=2 / block)  # ties at the threshold: at most a weight or two
    with pytest.raises(results.InputError, match="not a pruned variant"):
        results.pruned_matrices(rec, "int8")


def test_report_shows_landscape_attributions_and_pruning(gpt2) -> None:
    """The HTML report's new sections, rendered from the finished audit's stage records, carry the records'
    own figures: λmax, each block's attribution share (as results computes it) and a pruned variant's sparsity."""
    from microscope import report

    _, rec, _ = gpt2
    html = report.render(rec.stages, rec.architecture, None, None, 60, rec.variants, rec.saes)
    assert "<h2>Loss landscape and curvature</h2>" in html and "<h2>Attributions</h2>" in html
    land = rec.stages["landscape"]
    assert f"<td>{land.metrics['lambda_max']:.4g}</td>" in html
    assert "compare checkpoints of one run or a model with its variants, not across models" in html
    shares = results.layer_shares_table(rec.stages["attribution"], rec.stages["metrics"].details["sensitivity"])
    assert len(shares) == len(rec.stages["attribution"].details["layer_shares"]) > 0
    for block, pct in zip(shares["block"], shares["attribution_pct"], strict=True):
        assert f"<code>{block}</code></td><td>{pct:.1f}%</td>" in html
    sparsity = rec.variants["magnitude-50"]["quantize"].metrics["sparsity"]
    assert f"{100 * sparsity:.1f}% of the pruned matrices zero, no fine-tuning" in html
