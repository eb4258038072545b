"""The results API on real finished audits of a tiny GPT-2 run through the `microscope` command: two
checkpoints of one training run (steps 1 and 2, the second all cached) and a partial audit (ingest and
metrics only). Every figure the tables show is checked against where it came from: the record, the
features Parquet, or the weights themselves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from microscope import results
from microscope.errors import GateError, InputError
from microscope.store import ArtifactStore, open_store
from tests.conftest import FINISHED_RUN

RUN = FINISHED_RUN
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def audits(finished_audits: dict[str, dict]) -> tuple[ArtifactStore, dict[str, dict]]:
    return open_store(finished_audits["step1"]["store_uri"]), finished_audits


def test_list_audits_filters(audits) -> None:
    store, recs = audits
    ids = {k: r["audit_id"] for k, r in recs.items()}
    everything = results.list_audits(store)
    assert [a.audit_id for a in everything] == [ids["step1"], ids["step2"], ids["partial"]]  # oldest first
    run = results.list_audits(store, run_id=RUN)
    assert [(a.audit_id, a.step, a.run_id) for a in run] == [(ids["step1"], 1, RUN), (ids["step2"], 2, RUN)]
    ref = run[0]
    assert ref.status == "completed" and ref.digest == recs["step1"]["model_digest"]
    assert ref.model_source == recs["step1"]["model"]["source"]
    assert results.list_audits(store, run_id="no-such-run") == []
    assert len(results.list_audits(store, status="completed")) == 3
    assert results.list_audits(store, status="failed") == []
    assert len(results.list_audits(store, model=recs["step1"]["model_digest"][:12])) == 3
    assert results.list_audits(store, model="no-such-model") == []


def test_load_audit_and_manifest_digest(audits) -> None:
    store, recs = audits
    rec = results.load_audit(store, recs["step1"]["audit_id"])
    assert rec.audit_id == recs["step1"]["audit_id"]
    with pytest.raises(InputError, match="no audit"):
        results.load_audit(store, "20000101-000000-nothere")
    digest = results.manifest_digest(store, rec)
    assert digest == results.manifest_digest(store, results.load_audit(store, rec.audit_id))  # stable
    changed = rec.model_copy(deep=True)
    changed.stages["metrics"].config_hash = "0" * 16  # a recomputed stage: the cache key moves
    assert results.manifest_digest(store, changed) != digest


def test_layer_table_one_row_per_matrix_with_the_recorded_values(audits, tiny_gpt2_dir: Path) -> None:
    from safetensors.numpy import load_file

    store, recs = audits
    rec = results.load_audit(store, recs["step1"]["audit_id"])
    df = results.layer_table(store, rec)
    metrics = rec.stages["metrics"]
    weights = {w["name"]: w for w in metrics.details["weights"]}
    assert len(df) == len(weights) == metrics.metrics["matrices"] and df["name"].is_unique
    assert set(df["name"]) == set(weights)
    assert set(df.loc[df["layer"] >= 0, "layer"]) == {0, 1, 2}

    # spectral norms against the checkpoint's own weights (GPT-2 ties lm_head to wte, stored once)
    ckpt = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    alias = {"lm_head.weight": "transformer.wte.weight"}
    checked = 0
    for row in df.itertuples():
        w = ckpt.get(alias.get(row.name, row.name))
        if w is None:
            continue
        ref = np.linalg.norm(w.astype(np.float64).reshape(w.shape[0], -1), 2)
        assert row.spectral_norm == pytest.approx(ref, rel=1e-4), row.name
        assert {row.rows, row.cols} == {w.shape[0], int(np.prod(w.shape[1:]))}
        checked += 1
    assert checked == len(df)

    # every other weight figure, the flags and the sensitivity rows: exactly the record's
    sens = {s["name"]: s for s in metrics.details["sensitivity"]}
    for row in df.to_dict("records"):
        w = weights[row["name"]]
        for col in ("frobenius", "effective_rank", "stable_rank", "condition_number", "alpha"):
            assert row[col] == w[col] or (w[col] is None and math.isnan(row[col])), (row["name"], col)
        assert row["anomaly"] == bool(w["flags"]) and row["anomaly_reasons"] == w["flags"]
        assert len(row["anomalies"]) == len(w["flags"])
        assert set(row["anomalies"]) <= {"alpha", "effective_rank", "condition_number"}
        if row["name"] in sens:
            assert row["fisher_trace"] == sens[row["name"]]["fisher_trace"]
            assert row["hessian_trace"] == sens[row["name"]]["hessian_trace"]
        else:  # GPT-2's lm_head is tied to wte: sensitivity names it transformer.wte.weight
            assert row["name"] == "lm_head.weight" and math.isnan(row["fisher_trace"])
            assert "tied" in df.attrs["undefined"][row["name"]]["fisher_trace"]
    assert int(df["anomaly"].sum()) == metrics.metrics["flagged"]

    # per-block figures: joined on the block, repeated on its matrices, absent (NaN) elsewhere
    sae = rec.saes[HOOK]
    on_block = df["layer"] == 1
    assert (df.loc[on_block, "sae_fvu.resid"] == sae.metrics["fvu"]).all()
    assert (df.loc[on_block, "sae_l0.resid"] == sae.metrics["l0"]).all()
    assert (df.loc[on_block, "sae_dead_frac.resid"] == sae.metrics["dead_frac"]).all()
    assert df.loc[~on_block, "sae_fvu.resid"].isna().all()
    assert (df.loc[on_block, "sae_fvu[int8].resid"] == sae.details["variants"]["int8"]["fvu"]).all()
    drift = rec.variants["int8"]["quantize"].details["drift"]
    cka = metrics.details["cka"]
    for layer in (0, 1, 2):
        rows = df[df["layer"] == layer]
        hook = f"blocks.{layer}.hook_resid_post"
        assert (rows["quant_cosine[int8].resid"] == drift[hook]["cosine"]).all()
        assert (rows["cka[int8].resid"] == cka["variants"]["int8"][hook]).all()
        stats = rec.stages["trace"].details["datasets"][hook]["stats"]
        assert (rows["act_mean_norm.resid"] == stats["mean_norm"]).all()
    i = cka["layers"].index
    assert (df.loc[df["layer"] == 0, "cka_next.resid"] == cka["matrix"][i("blocks.0.hook_resid_post")][i(HOOK)]).all()
    assert df.loc[df["layer"] == 0, "cka_prev.resid"].isna().all()
    assert not any(c.startswith("attack_") for c in df.columns)  # robustness did not run: no column at all
    assert "add robustness to --stages" in df.attrs["missing"]["robustness"]
    assert set(df.attrs["missing"]) == {"robustness"}
    # CE recovered is undefined on this tiny model: absent from the figures, its reason kept
    if "ce_recovered" in sae.undefined:
        assert "sae_ce_recovered.resid" not in df.columns
        some = df.loc[on_block, "name"].iloc[0]
        assert df.attrs["undefined"][some]["sae_ce_recovered.resid"] == sae.undefined["ce_recovered"]


def test_features_and_contexts(audits) -> None:
    import pyarrow.parquet as pq

    store, recs = audits
    rec = results.load_audit(store, recs["step1"]["audit_id"])
    sae = rec.saes[HOOK]
    df = results.features(store, rec, HOOK)
    assert len(df) == sae.details["d_sae"] == sae.metrics["d_sae"]
    assert list(df["feature"]) == list(range(len(df)))
    stored = pq.read_table(store.local_path(f"{sae.details['prefix']}/features.parquet")).to_pylist()
    assert df["density"].tolist() == [r["density"] for r in stored]
    assert df["mean_activation"].tolist() == [r["mean_activation"] for r in stored]
    assert df["top_logits"].tolist() == [r["top_logits"] for r in stored]
    fired = int(df["density"].gt(0).idxmax())
    ctx = results.feature_contexts(store, rec, HOOK, fired)
    assert ctx == [dict(c) for c in stored[fired]["top_contexts"]] and ctx
    acts = [c["activation"] for c in ctx]
    assert acts == sorted(acts, reverse=True)
    assert df.loc[fired, "max_activation"] == pytest.approx(acts[0])
    assert df.loc[fired, "top_context"] == f"{ctx[0]['left']}[{ctx[0]['token']}]{ctx[0]['right']}"
    with pytest.raises(InputError, match="outside the SAE"):
        results.feature_contexts(store, rec, HOOK, len(df))
    other = results.features(store, rec, "blocks.0.hook_resid_post")  # traced, but no SAE on it
    assert other.empty and "sae.hooks" in other.attrs["missing"]["sae"]
    assert results.feature_contexts(store, rec, "blocks.0.hook_resid_post", 0) == []


def test_run_series_orders_the_run_by_step(audits) -> None:
    store, recs = audits
    s = results.run_series(store, RUN)
    assert list(s["step"]) == [1, 2]
    assert list(s["audit_id"]) == [recs["step1"]["audit_id"], recs["step2"]["audit_id"]]
    for row, key in zip(s.to_dict("records"), ("step1", "step2"), strict=True):
        assert row[f"sae[{HOOK}].fvu"] == recs[key]["saes"][HOOK]["metrics"]["fvu"]
        assert row["metrics.alpha_mean"] == recs[key]["stages"]["metrics"]["metrics"]["alpha_mean"]
        assert row["quantize[int8].kl_mean"] == recs[key]["variants"]["int8"]["quantize"]["metrics"]["kl_mean"]
    assert "2 of 2 audits" in s.attrs["missing"]["robustness"]
    per_layer = results.run_series(store, RUN, layers=True)
    n = int(recs["step1"]["stages"]["metrics"]["metrics"]["matrices"])
    assert len(per_layer) == 2 * n and list(per_layer["step"]) == [1] * n + [2] * n
    assert "spectral_norm" in per_layer.columns and "sae_fvu.resid" in per_layer.columns
    empty = results.run_series(store, "no-such-run")
    assert empty.empty and "--run-id no-such-run" in empty.attrs["missing"]["run"]


def test_partial_audit_lacks_what_it_did_not_compute(audits) -> None:
    store, recs = audits
    rec = results.load_audit(store, recs["partial"]["audit_id"])
    df = results.layer_table(store, rec)
    assert len(df) == rec.stages["metrics"].metrics["matrices"]
    assert "spectral_norm" in df.columns and "fisher_trace" in df.columns
    assert not [c for c in df.columns if c.startswith(("sae_", "quant_", "cka", "act_", "attack_"))]
    why = df.attrs["missing"]["sae"]
    assert "did not run" in why and "--stages" in why and "sae.hooks" in why
    assert {"trace", "quantize", "robustness", "metrics.cka"} <= set(df.attrs["missing"])
    feats = results.features(store, rec, HOOK)
    assert feats.empty and feats.attrs["missing"]["sae"] == why
    assert results.feature_contexts(store, rec, HOOK, 0) == []


def test_a_failed_stage_never_raises(audits) -> None:
    """The record of an audit whose metrics and SAE failed (written the way the flow writes failures)."""
    from schemas.records import StageRecord, StageStatus

    store, recs = audits
    rec = results.load_audit(store, recs["step1"]["audit_id"]).model_copy(deep=True)
    rec.status = StageStatus.failed
    rec.stages["metrics"] = StageRecord(stage="metrics", status=StageStatus.failed, error="ValueError: boom")
    rec.saes[HOOK] = StageRecord(stage="sae", status=StageStatus.failed, error="OOM")
    df = results.layer_table(store, rec)
    assert list(df["role"]) == ["block"] * 3 and list(df["layer"]) == [0, 1, 2]  # rows fall back to blocks
    assert "quant_cosine[int8].resid" in df.columns and "spectral_norm" not in df.columns
    assert not [c for c in df.columns if c.startswith("sae_")]
    assert (
        "boom" in df.attrs["missing"]["metrics"]
        and f"audits/{rec.audit_id}/metrics.log" in df.attrs["missing"]["metrics"]
    )
    assert "OOM" in df.attrs["missing"][f"sae[{HOOK}]"]
    assert results.features(store, rec, HOOK).attrs["missing"]["sae"].startswith(f"the SAE on {HOOK} failed")


def test_every_layer_column_of_a_real_audit_passes_the_pre_run_path_check(audits) -> None:
    """gates.check_path refuses a typo'd layer column before an audit runs, from a static vocabulary: a real
    table's every column must pass it, so a column added to the table cannot be refused by mistake."""
    from microscope.gates import IDENTITY, check_path

    store, recs = audits
    table = results.layer_table(store, results.load_audit(store, recs["step1"]["audit_id"]))
    columns = [c for c in table.columns if c not in IDENTITY]
    assert len(columns) > 20, columns  # weights, sensitivity, per-block act/quant/sae/cka columns
    for c in columns:
        check_path(f"layers.*.{c}", "test")
    with pytest.raises(GateError, match="names no layer-table column"):
        check_path("layers.*.nonexistent_metric", "test")
