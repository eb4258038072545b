"""Qdrant in local mode: a layer finds itself first and its like in other models; a re-run audit on identical
weights adds no second hit (one hit per content, naming both audits, found from either)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from microscope.spectra import matrix_stats, power_law_fit
from microscope.store import LocalStore
from microscope.vectors import FEATURES, LAYERS, VectorIndex, features_collection, layer_embedding
from schemas.records import AuditRecord, ModelRef, StageStatus
from tests.conftest import build_model


def layer_rows(model) -> list[tuple[str, np.ndarray, dict]]:
    rows = []
    for name, p in model.named_parameters():
        if p.dim() == 2:
            stats = matrix_stats(p.detach().numpy())
            rows.append((name, layer_embedding(stats, power_law_fit(stats["singular_values"])), {}))
    return rows


def record(store: LocalStore, audit_id: str) -> None:
    """A finished audit's record: what `microscope search --like AUDIT:...` resolves the audit id through."""
    rec = AuditRecord(
        audit_id=audit_id,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        status=StageStatus.completed,
        model=ModelRef(source="m", source_fingerprint="f"),
        model_digest="dg",
        config={},
        store_uri=store.uri,
    )
    store.put_bytes(f"audits/{audit_id}.json", rec.model_dump_json().encode())


def test_layers_find_themselves_and_the_same_layer_of_another_model(tmp_path: Path) -> None:
    gpt2, llama = build_model("gpt2"), build_model("llama")
    with VectorIndex(path=str(tmp_path / "q")) as index:
        index.add_layers("audit-a", "dg", "fp", layer_rows(gpt2), source="dg/metrics/1")
        index.add_layers("audit-c", "dl", "fp", layer_rows(llama), source="dl/metrics/1")
        layer = "transformer.h.1.mlp.c_fc.weight"
        hits = index.similar(LAYERS, ("audit-a", "fp", layer), 40)
        assert (hits[0]["audit_id"], hits[0]["layer"]) == ("audit-a", layer) and hits[0]["score"] > 0.9999
        assert {h["audit_id"] for h in hits} == {"audit-a", "audit-c"}  # across models
        assert index.similar(LAYERS, ("audit-z", "fp", layer), 3) == []


def test_a_rerun_audit_adds_no_duplicate_hits_and_either_audit_finds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-running an audit by hand indexes the same weights and SAE (same digest, same content-addressed
    artifacts) again under a second audit id: each layer and feature stays one point and one hit, listing
    both audits, and both audits find it, through the index and through `microscope search --like`."""
    from flows.cli import main

    gpt2, llama = layer_rows(build_model("gpt2")), layer_rows(build_model("llama"))
    w = np.random.default_rng(0).standard_normal((50, 16))
    hook, layer = "blocks.1.hook_resid_post", "transformer.h.1.mlp.c_fc.weight"
    store = LocalStore(tmp_path / "store")
    with VectorIndex(path=str(tmp_path / "q")) as index:
        for audit in ("audit-a", "audit-b"):  # the audit, then its re-run: the same content
            record(store, audit)
            index.add_layers(audit, "dg", "fp", gpt2, source="dg/metrics/1/layer_vectors.npz")
            index.add_features(audit, hook, w, np.full(50, 0.01), [["x"]] * 50, model_digest="dg", source="dg/sae/2")
        index.add_layers("audit-c", "dl", "fp", llama, source="dl/metrics/1/layer_vectors.npz")
        index.add_features("audit-c", hook, -w, np.full(50, 0.01), [["y"]] * 50, model_digest="dl", source="dl/sae/2")
        assert index.client.count(LAYERS).count == len(gpt2) + len(llama)
        assert index.client.count(features_collection(16)).count == 100
        for asker, other in (("audit-a", "audit-b"), ("audit-b", "audit-a")):
            hits = index.similar(LAYERS, (asker, "fp", layer), 20)
            seen = [(h["model_digest"], h["layer"]) for h in hits]
            assert len(hits) == 20 and len(set(seen)) == 20  # one hit per (weights, layer), not one per audit
            assert hits[0]["layer"] == layer and hits[0]["score"] > 0.9999
            assert all(h["audit_ids"] == ["audit-a", "audit-b"] for h in hits if h["model_digest"] == "dg")
            assert hits[0]["audit_id"] == other  # the asked layer itself names the audit that shares it
            feats = index.similar(FEATURES, (asker, hook, 7), 6)
            seen = [(h["source"], h["feature"]) for h in feats]
            assert len(set(seen)) == 6 and feats[0]["feature"] == 7 and feats[0]["audit_ids"] == ["audit-a", "audit-b"]
            assert all(h["audit_ids"] == ["audit-c"] for h in feats if h["model_digest"] == "dl")
        index.add_layers("audit-a", "dg", "fp", gpt2, source="dg/metrics/1/layer_vectors.npz")  # indexed again
        assert index.client.count(LAYERS).count == len(gpt2) + len(llama)
        assert index.similar(LAYERS, ("audit-a", "fp", layer), 1)[0]["audit_ids"] == ["audit-a", "audit-b"]
    monkeypatch.setenv("MICROSCOPE_QDRANT_PATH", str(tmp_path / "q"))  # the CLI opens the same local folder
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.delenv("MICROSCOPE_QDRANT_URL", raising=False)
    for asker in ("audit-a", "audit-b"):
        for what, like in (("layers", f"{asker}:{layer}"), ("features", f"{asker}:{hook}:7")):
            capsys.readouterr()
            assert main(["--store", store.uri, "search", what, "--like", like, "-k", "5", "--json"]) == 0
            hits = json.loads(capsys.readouterr().out)
            ident = [(h["model_digest"], h["layer"], h.get("feature")) for h in hits]
            assert len(hits) == 5 and len(set(ident)) == 5
            assert hits[0]["audit_ids"] == ["audit-a", "audit-b"] and hits[0]["score"] > 0.9999


def test_layers_indexed_per_audit_before_content_ids_collapse_at_query_time(tmp_path: Path) -> None:
    """An index written before content ids holds one point per audit (id from the audit, no `audit_ids`):
    the query still returns one hit per (weights, layer), naming both audits, found from either."""
    from qdrant_client.models import PointStruct

    from microscope.vectors import LAYER_DIM, _point_id

    rows = layer_rows(build_model("gpt2"))
    layer = rows[0][0]
    with VectorIndex(path=str(tmp_path / "q")) as index:
        index._ensure(LAYERS, LAYER_DIM)
        for audit in ("old-a", "old-b"):
            index.client.upsert(
                LAYERS,
                points=[
                    PointStruct(
                        id=_point_id(audit, "fp", n),
                        vector=v.tolist(),
                        payload={"audit_id": audit, "model_digest": "dg", "variant": "fp", "layer": n},
                    )
                    for n, v, _ in rows
                ],
            )
        for asker in ("old-a", "old-b"):
            hits = index.similar(LAYERS, (asker, "fp", layer), len(rows))
            assert [h["layer"] for h in hits].count(layer) == 1 and len({h["layer"] for h in hits}) == len(rows)
            assert hits[0]["layer"] == layer and hits[0]["audit_ids"] == ["old-a", "old-b"]


def test_features_search_by_decoder_direction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 16))
    with VectorIndex(path=str(tmp_path / "q")) as index:
        kw = {"model_digest": "d"}
        index.add_features("a", "blocks.1.hook_resid_post", w, np.full(50, 0.01), [["x"]] * 50, **kw, source="d/sae/1")
        index.add_features(
            "b", "blocks.1.hook_resid_post", w[::-1] * 3, np.full(50, 0.02), [["y"]] * 50, **kw, source="d/sae/2"
        )  # another SAE (config) on the same weights: its features are its own
        hits = index.similar(FEATURES, ("a", "blocks.1.hook_resid_post", 7), 3)
        top2 = {(h["audit_id"], h["feature"]) for h in hits[:2]}  # itself and its twin tie at cosine 1
        assert top2 == {("a", 7), ("b", 42)}
        twin = next(h for h in hits if h["audit_id"] == "b")
        assert twin["feature"] == 49 - 7 and twin["score"] > 0.9999  # same direction, other SAE, other id


def test_standardised_embeddings_tell_layers_of_one_model_apart(tmp_path: Path) -> None:
    """Raw statistics of one model's matrices all point the same way; standardised across the model they
    spread out, and a re-run on identical weights still finds its twin first."""
    from microscope.vectors import standardise_layers

    rows = layer_rows(build_model("gpt2"))
    raw = {n: v for n, v, _ in rows}
    std = standardise_layers(raw)

    def mean_offdiag_cos(vecs: dict[str, np.ndarray]) -> float:
        m = np.stack([v / np.linalg.norm(v) for v in vecs.values()])
        c = m @ m.T
        return float(c[~np.eye(len(c), dtype=bool)].mean())

    assert mean_offdiag_cos(raw) > 0.9 and mean_offdiag_cos(std) < 0.5
    with VectorIndex(path=str(tmp_path / "q")) as index:
        for audit in ("a", "b"):  # two checkpoints (two digests) with the same statistics
            index.add_layers(audit, f"dg-{audit}", "fp", [(n, v, {}) for n, v in std.items()])
        layer = "transformer.h.0.attn.c_attn.weight"
        hits = index.similar(LAYERS, ("a", "fp", layer), 3)
        assert {(h["audit_id"], h["layer"]) for h in hits[:2]} == {("a", layer), ("b", layer)}
        assert hits[2]["score"] < 0.99  # the next layer is clearly further away


def test_an_undefined_statistic_never_puts_nan_in_a_layer_vector() -> None:
    """The randomized spectrum path leaves the condition number undefined: the standardised vector holds
    the model's mean there (z = 0), not NaN."""
    from microscope.vectors import HEAD, standardise_layers

    rng = np.random.default_rng(0)
    raw = {}
    for i, exact_max_dim in enumerate((None, None, 8)):
        stats = matrix_stats(rng.standard_normal((40, 30)), exact_max_dim=exact_max_dim, rank=4)
        raw[f"m{i}"] = layer_embedding(stats, power_law_fit(stats["singular_values"]))
    assert np.isnan(raw["m2"][2])  # log10 condition number: undefined
    out = standardise_layers(raw)
    assert all(np.isfinite(v).all() for v in out.values()) and out["m2"][2] == 0 and len(out["m2"]) > HEAD


def test_features_of_models_of_other_widths_share_the_index(tmp_path: Path) -> None:
    """A 16-wide and a 24-wide model's SAEs in one index (the demo's GPT-2 and MiniLM): each is indexed, and each
    finds its own neighbours, never the other width's (their directions live in different spaces)."""
    rng = np.random.default_rng(0)
    narrow, wide = rng.standard_normal((20, 16)), rng.standard_normal((30, 24))
    with VectorIndex(path=str(tmp_path / "q")) as index:
        index.add_features(
            "n",
            "blocks.0.hook_resid_post",
            narrow,
            np.full(20, 0.1),
            [["a"]] * 20,
            model_digest="dn",
            source="dn/sae/1",
        )
        index.add_features(
            "w", "blocks.0.hook_resid_post", wide, np.full(30, 0.1), [["b"]] * 30, model_digest="dw", source="dw/sae/1"
        )
        assert index.client.count(features_collection(16)).count == 20
        assert index.client.count(features_collection(24)).count == 30
        for audit, n, digest in (("n", 20, "dn"), ("w", 30, "dw")):
            hits = index.similar(FEATURES, (audit, "blocks.0.hook_resid_post", 3), 50)
            assert len(hits) == n and {h["model_digest"] for h in hits} == {digest}
            assert hits[0]["feature"] == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-6)
