"""Qdrant in local mode: a layer finds itself first, and the same layer of a re-run audit on identical
weights is its nearest neighbour from another audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from microscope.spectra import matrix_stats, power_law_fit
from microscope.vectors import FEATURES, LAYERS, VectorIndex, layer_embedding
from tests.conftest import build_model


def layer_rows(model) -> list[tuple[str, np.ndarray, dict]]:
    rows = []
    for name, p in model.named_parameters():
        if p.dim() == 2:
            stats = matrix_stats(p.detach().numpy())
            rows.append((name, layer_embedding(stats, power_law_fit(stats["singular_values"])), {}))
    return rows


def test_layers_find_themselves_and_their_twin_from_another_audit(tmp_path: Path) -> None:
    gpt2, llama = build_model("gpt2"), build_model("llama")
    with VectorIndex(path=str(tmp_path / "q")) as index:
        index.add_layers("audit-a", "dg", "fp", layer_rows(gpt2))
        index.add_layers("audit-b", "dg", "fp", layer_rows(gpt2))  # identical weights, re-run
        index.add_layers("audit-c", "dl", "fp", layer_rows(llama))
        layer = "transformer.h.1.mlp.c_fc.weight"
        own = [h for h in index.similar(LAYERS, ("audit-a", "fp", layer), 5) if h["audit_id"] == "audit-a"]
        assert own[0]["layer"] == layer and own[0]["score"] > 0.9999
        other = [h for h in index.similar(LAYERS, ("audit-a", "fp", layer), 10) if h["audit_id"] != "audit-a"]
        assert other[0]["audit_id"] == "audit-b" and other[0]["layer"] == layer
        assert index.similar(LAYERS, ("audit-z", "fp", layer), 3) == []


def test_features_search_by_decoder_direction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 16))
    with VectorIndex(path=str(tmp_path / "q")) as index:
        index.add_features("a", "blocks.1.hook_resid_post", w, np.full(50, 0.01), [["x"]] * 50)
        index.add_features("b", "blocks.1.hook_resid_post", w[::-1] * 3, np.full(50, 0.02), [["y"]] * 50)
        hits = index.similar(FEATURES, ("a", "blocks.1.hook_resid_post", 7), 3)
        top2 = {(h["audit_id"], h["feature"]) for h in hits[:2]}  # itself and its twin tie at cosine 1
        assert top2 == {("a", 7), ("b", 42)}
        twin = next(h for h in hits if h["audit_id"] == "b")
        assert twin["feature"] == 49 - 7 and twin["score"] > 0.9999  # same direction, other audit, other id


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
        for audit in ("a", "b"):
            index.add_layers(audit, "dg", "fp", [(n, v, {}) for n, v in std.items()])
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
