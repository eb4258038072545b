"""Typed stage details and the record's schema version, on real audit records.

data/records-v1/ holds records written by the demo before issue 22 (version 1: no schema_version), copied as
they were written, and one made in the shape of an older writer (its name says so; see
test_an_older_writers_record_is_filled_in). Every check compares typed values with the raw JSON read by
json.load, never with the models' own output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.details import (
    AggregateDetails,
    FailedDetails,
    IngestDetails,
    SkippedDetails,
    details_model,
    details_of,
    gate_details,
    ingest_details,
    metrics_details,
    metrics_shard_details,
    quantize_details,
    robustness_details,
    sae_details,
    trace_details,
)
from schemas.migrations import SCHEMA_VERSION, SchemaVersionError
from schemas.records import AuditRecord, StageRecord

V1 = Path(__file__).parent / "data" / "records-v1"
V1_FILES = sorted(V1.glob("*.json"))
OLDER_WRITER = "older-writer"  # in the name of the record made in an older writer's shape


def _raw(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _stage_records(rec: AuditRecord) -> dict[str, StageRecord]:
    """Every stage record of an audit, by where it is."""
    out = {f"stages.{k}": r for k, r in rec.stages.items()}
    out |= {f"variants.{v}.{k}": r for v, recs in rec.variants.items() for k, r in recs.items()}
    return out | {f"saes.{h}": r for h, r in rec.saes.items()}


def _same(a: Any, b: Any) -> bool:
    """Equal as stored JSON (NaN equals NaN there; key order aside)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_the_stored_records_cover_every_stage_kind() -> None:
    kinds = {
        type(details_of(r)).__name__
        for f in V1_FILES
        for r in _stage_records(AuditRecord.model_validate(_raw(f))).values()
    }
    for want in ("Ingest", "Quantize", "Trace", "Sae", "Metrics", "Robustness", "Report", "Skipped", "Aggregate"):
        assert f"{want}Details" in kinds, kinds
    assert "GateVerdict" in kinds


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.stem)
def test_a_version_1_record_loads_as_version_2(path: Path) -> None:
    raw = _raw(path)
    assert "schema_version" not in raw  # written before there was one
    rec = AuditRecord.model_validate(raw)
    assert rec.schema_version == SCHEMA_VERSION == 2
    for where, r in _stage_records(rec).items():
        typed = details_of(r)  # raises where a stage's details do not fit its model
        if OLDER_WRITER not in path.stem:  # written by today's writers: the model gives back exactly that
            assert _same(typed.model_dump(mode="json"), r.details), where


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.stem)
def test_typed_values_are_the_stored_ones(path: Path) -> None:
    raw = _raw(path)
    rec = AuditRecord.model_validate(raw)
    stages = raw["stages"]
    ing = ingest_details(rec.stages["ingest"])
    assert ing.model_digest == stages["ingest"]["details"]["model_digest"]
    assert ing.prefix == stages["ingest"]["details"]["prefix"]
    if ing.modality == "images":
        assert ing.image_shape == stages["ingest"]["details"]["image_shape"]
    if rec.stages["trace"].status.value in ("completed", "cached"):
        for hook, d in trace_details(rec.stages["trace"]).datasets.items():
            assert d.rows == stages["trace"]["details"]["datasets"][hook]["rows"]
            assert d.parts == stages["trace"]["details"]["datasets"][hook]["parts"]
    for fmt, recs in rec.variants.items():
        if "quantize" in recs and recs["quantize"].status.value in ("completed", "cached"):
            q, raw_q = quantize_details(recs["quantize"]), raw["variants"][fmt]["quantize"]["details"]
            assert q.produced == raw_q["produced"]
            assert {h: d.cosine for h, d in q.drift.items()} == {h: d["cosine"] for h, d in raw_q["drift"].items()}
    for hook, r in rec.saes.items():
        s, raw_s = sae_details(r), raw["saes"][hook]["details"]
        assert (s.hook, s.d_sae, s.density_hist.counts) == (hook, raw_s["d_sae"], raw_s["density_hist"]["counts"])
        assert [f.feature for f in s.top_features] == [f["feature"] for f in raw_s["top_features"]]
    if rec.stages["metrics"].status.value in ("completed", "cached"):
        m, raw_m = metrics_details(rec.stages["metrics"]), stages["metrics"]["details"]
        assert [w.name for w in m.weights] == [w["name"] for w in raw_m["weights"]]
        assert [w.spectral_norm for w in m.weights] == [w["spectral_norm"] for w in raw_m["weights"]]
        assert [w.flags for w in m.weights] == [w["flags"] for w in raw_m["weights"]]
    if rec.stages["robustness"].status.value in ("completed", "cached", "partial"):
        rb, raw_r = robustness_details(rec.stages["robustness"]), stages["robustness"]["details"]
        assert [a.robust for a in rb.autoattack] == [a["robust"] for a in raw_r["autoattack"]]
        assert rb.curves.pgd == raw_r["curves"]["pgd"]
    if "gate" in rec.stages:
        g, raw_g = gate_details(rec.stages["gate"]), stages["gate"]["details"]
        assert (g.verdict, [r.outcome for r in g.results]) == (
            raw_g["verdict"],
            [r["outcome"] for r in raw_g["results"]],
        )


def test_an_older_writers_record_is_filled_in() -> None:
    """The record named *older-writer* is the demo's text record with what writers before issue 21 and joint SAE
    training left out taken away: ingest's weights_digest (issue 21 #1), nonfinite (#3), documents_read,
    documents_tokenized and last_document_cut (#5), and the SAE's trained_with and variant_fate_skipped. Loading
    fills what readers need (weights_digest: that model_digest was the weights' digest; trained_with: its own
    hook); what was never measured stays absent."""
    (path,) = [p for p in V1_FILES if OLDER_WRITER in p.stem]
    raw = _raw(path)
    assert "weights_digest" not in raw["stages"]["ingest"]["details"]
    rec = AuditRecord.model_validate(raw)
    ing = ingest_details(rec.stages["ingest"])
    assert ing.weights_digest == raw["stages"]["ingest"]["details"]["model_digest"]
    assert ing.nonfinite is None and ing.documents_read is None
    assert "nonfinite" not in ing.model_dump(mode="json")  # not written as null: it was never counted
    for hook, r in rec.saes.items():
        assert "trained_with" not in raw["saes"][hook]["details"]
        s = sae_details(r)
        assert (s.trained_with, s.variant_fate_skipped) == ([hook], {})


def test_a_newer_schema_version_is_refused_in_one_line() -> None:
    raw = _raw(V1_FILES[0]) | {"schema_version": SCHEMA_VERSION + 1}
    want = (
        f"audit record {raw['audit_id']} has schema version {SCHEMA_VERSION + 1}; this Microscope reads up to "
        f"{SCHEMA_VERSION}: upgrade Microscope"
    )
    for load in (lambda: AuditRecord.model_validate(raw), lambda: AuditRecord.model_validate_json(json.dumps(raw))):
        with pytest.raises(SchemaVersionError) as got:
            load()
        assert str(got.value) == want
        assert isinstance(got.value, ValueError)  # what the audit listing catches for an unreadable record


@pytest.mark.parametrize("path", V1_FILES, ids=lambda p: p.stem)
def test_a_record_round_trips_through_its_dump(path: Path) -> None:
    rec = AuditRecord.model_validate(_raw(path))
    dumped = rec.model_dump(mode="json")
    assert dumped["schema_version"] == SCHEMA_VERSION
    assert AuditRecord.model_validate(dumped) == rec
    assert AuditRecord.model_validate_json(rec.model_dump_json()) == rec


def test_the_record_of_each_outcome_takes_its_model() -> None:
    skipped = StageRecord(stage="trace", status="skipped", details={"reason": "not requested"})
    failed = StageRecord(stage="ingest", status="failed", error="ingest: no", details={"input_error": True})
    bare = StageRecord(stage="gate", status="failed", error="gate: no rules")
    parts = StageRecord(stage="sae", status="partial", details={"parts": {"h": "failed"}, "reasons": {"h": "x"}})
    assert [details_model(r) for r in (skipped, failed, bare, parts)] == [
        SkippedDetails,
        FailedDetails,
        FailedDetails,
        AggregateDetails,
    ]
    assert details_of(bare).model_dump(mode="json") == {}  # no input_error written: none is made up
    with pytest.raises(ValueError, match="holds FailedDetails, not IngestDetails: ingest: no"):
        ingest_details(failed)
    with pytest.raises(ValueError, match="no details model"):
        details_of(StageRecord(stage="no-such-stage", status="completed"))


def test_a_key_no_model_declares_is_refused() -> None:
    raw = _raw(V1_FILES[0])["stages"]["ingest"]["details"]
    IngestDetails.model_validate(raw)
    with pytest.raises(ValueError, match="extra_key"):
        IngestDetails.model_validate(raw | {"extra_key": 1})


def test_todays_writers_fit_the_models(finished_audits: dict[str, dict]) -> None:
    """Fresh audits of a tiny GPT-2: every stage record of their records, and every record the store's
    manifests hold (the metrics weight shards among them), gives back exactly its details."""
    stores = set()
    for name, raw in finished_audits.items():
        rec = AuditRecord.model_validate(raw)
        assert raw["schema_version"] == rec.schema_version == SCHEMA_VERSION
        for where, r in _stage_records(rec).items():
            assert _same(details_of(r).model_dump(mode="json"), r.details), f"{name} {where}"
        stores.add(Path(rec.store_uri))
    manifests = [m for s in stores for m in s.rglob("manifest.json")]
    kinds = set()
    for m in manifests:
        r = StageRecord.model_validate(json.loads(m.read_text())["record"])
        assert _same(details_of(r).model_dump(mode="json"), r.details), m
        kinds.add(details_model(r).__name__)
    assert "MetricsShardDetails" in kinds, kinds
    raw_shard = next(json.loads(m.read_text())["record"] for m in manifests if "/metrics-weights/" in str(m))
    shard = StageRecord.model_validate(raw_shard)
    assert metrics_shard_details(shard).spectra_key == raw_shard["details"]["spectra_key"]


def test_a_writers_dict_comes_back_exactly() -> None:
    """What ingest writes for an image checkpoint audited with non-finite weights: the text-only keys stay
    absent, the counts typed."""
    written = {
        "prefix": "0123456789abcdef/ingest/fedcba9876543210",
        "model_digest": "m" * 64,
        "weights_digest": "w" * 64,
        "nonfinite": {"conv1.weight": {"nan": 3, "inf": 1}},
        "dataset_digest": "d" * 64,
        "modality": "images",
        "images_key": "0123456789abcdef/ingest/fedcba9876543210/images.npz",
        "image_shape": [1, 28, 28],
    }
    typed = IngestDetails.model_validate(written)
    assert typed.nonfinite is not None and typed.nonfinite["conv1.weight"].nan == 3
    assert typed.model_dump(mode="json") == written
    assert list(typed.model_dump(mode="json")) == list(written)  # in the writer's order too
    with pytest.raises(ValueError, match="images ingest details lack images_key"):
        IngestDetails.model_validate({k: v for k, v in written.items() if k != "images_key"})
