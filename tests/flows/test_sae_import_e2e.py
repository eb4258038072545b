"""`microscope sae import` on a real audit: an SAE built and saved by SAELens, attached to the finished tiny
GPT-2 audit's traced hook (a copy of its store: the session's audits stay as they are), read back by
`results.features`, its densities those of SAELens' own encode on the traced tokens."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

HOOK = "blocks.1.hook_resid_post"


def test_import_saelens_sae_onto_finished_audit(
    finished_audits: dict[str, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    from flows.sae_cmd import add_parser
    from microscope import audits, results
    from microscope.sae.data import parquet_rows
    from microscope.store import LocalStore

    src = finished_audits["step1"]
    store = LocalStore(tmp_path / "store")
    shutil.copytree(src["store_uri"], store.root, dirs_exist_ok=True)
    record = audits.load(store, src["audit_id"])
    ds = record.stages["trace"].details["datasets"][HOOK]
    paths = [store.local_path(k) for k in ds["parts"]]
    d = next(parquet_rows(paths))[0].shape[1]

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=3 * d))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 3 * d, generator=g) / d**0.5)
        sae.W_dec.copy_(torch.randn(3 * d, d, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(3 * d, generator=g) - 1.0)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    sae.save_model(tmp_path / "sae")

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["sae", "import", str(tmp_path / "sae"), "--audit", src["audit_id"], "--hook", HOOK]
    args = parser.parse_args([*argv, "--store", store.uri, "--json"])
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    key = f"{HOOK}@import"  # the audit trained its own SAE on the hook: both are kept
    assert out["key"] == key and out["d_sae"] == 3 * d and out["features"]["count"] == 3 * d
    record = audits.load(store, src["audit_id"])
    assert record.saes[HOOK].details.get("imported") is None
    assert record.saes[key].details["imported"]["saelens_cfg"]["architecture"] == "standard"
    assert "fvu" in record.saes[key].metrics

    df = results.features(store, record, key)
    assert len(df) == 3 * d and not df.attrs["missing"].get("sae")
    fires, n = np.zeros(3 * d), 0
    with torch.no_grad():
        for x, _, _ in parquet_rows(paths):
            fires += (sae.encode(torch.from_numpy(np.array(x, dtype=np.float32))) > 0).sum(0).numpy()
            n += len(x)
    np.testing.assert_allclose(df["density"].to_numpy(), fires / n, atol=1e-6)
    assert 0 < (fires / n).mean() < 1
    assert results.feature_contexts(store, record, key, int(np.argmax(fires)))

    # the same SAE again: the stored description is reused, the record keeps one import per hook
    assert args.fn(parser.parse_args([*argv, "--store", store.uri])) == 0
    assert "saes['blocks.1.hook_resid_post@import']" in capsys.readouterr().out
    assert sorted(audits.load(store, src["audit_id"]).saes) == [HOOK, key]

    # the imported record's details are a valid SaeDetails (provenance included); steering works on it
    from microscope.steering import Edit
    from microscope.steering_audit import open_lab
    from schemas.details import details_of

    assert details_of(record.saes[key]).imported.saelens_cfg["architecture"] == "standard"
    lab = open_lab(store, src["audit_id"], key)
    assert lab.module_path == record.stages["trace"].details["datasets"][HOOK]["module"]
    feature = int(np.argmax(fires))
    res = lab.steerer.compare(torch.tensor([[5, 6, 7, 8]]), [Edit(feature, "add", 1.0)])
    # an add moves the residual by max_act·‖W_dec[i]‖ at each token (a random SAE's own feature may even drop)
    shift = float(lab.max_acts[feature] * lab.steerer.sae.W_dec[feature].double().norm())
    assert res["kl"] > 0 and res["residual_shift"] == pytest.approx(shift, rel=1e-5)

    # an SAELens SAE imported one block lower gives the audit's own SAE an upstream: its features' provenance
    from microscope.provenance import graph_dot, provenance

    (tmp_path / "sae0").mkdir()
    sae.save_model(tmp_path / "sae0")
    lower = "blocks.0.hook_resid_post"
    args = parser.parse_args(
        ["sae", "import", str(tmp_path / "sae0"), "--audit", src["audit_id"], "--hook", lower, "--store", store.uri]
    )
    assert args.fn(args) == 0
    own = int(results.features(store, audits.load(store, src["audit_id"]), HOOK)["density"].idxmax())
    prov = provenance(store, src["audit_id"], HOOK, own, top=5)
    assert prov["upstream_hook"] == lower and prov["contexts_used"] > 0 and prov["edges"]
    assert all(e["share"] <= 1 for e in prov["edges"]) and sum(e["share"] for e in prov["edges"]) <= 1 + 1e-9
    assert graph_dot(prov).startswith("digraph")
