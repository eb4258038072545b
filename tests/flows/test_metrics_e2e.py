"""The metrics stage through the pipeline: statistics with flags, sensitivity, CKA, Qdrant search from
the CLI (a layer finds itself; a re-run on identical weights finds its twin in the other audit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import audit_json, cli_env, run_cli

CONFIG = """
dataset:
  seq_len: 32
  max_tokens: 1024
quantize:
  formats: [torch-int8]
  eval_windows: 4
trace:
  layers: [0, 1, 2]
  hooks: [resid]
metrics:
  hutchinson_probes: 8
  cka_tokens: 256
"""


def test_metrics_and_search(prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path, prefect_api)
    first = audit_json(tiny_gpt2_dir, corpus_file, CONFIG, env, tmp_path)
    m = first["stages"]["metrics"]
    assert m["status"] == "completed"
    rows = {r["name"]: r for r in m["details"]["weights"]}
    w = rows["transformer.h.1.mlp.c_fc.weight"]
    assert w["shape"] == [32, 128] and w["layer"] == 1 and isinstance(w["flags"], list)
    assert m["metrics"]["matrices"] == len(rows) and np.isfinite(m["metrics"]["hessian_trace_total"])
    sens = {r["name"]: r for r in m["details"]["sensitivity"]}
    assert sens["transformer.h.0.attn.c_attn.weight"]["fisher_trace"] > 0
    cka = m["details"]["cka"]
    assert cka["layers"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert (
        np.allclose(np.diag(cka["matrix"]), 1) and 0.9 < cka["variants"]["torch-int8"]["blocks.1.hook_resid_post"] <= 1
    )

    # A second audit of the same weights (metrics cached, indexed again under its own id).
    second = audit_json(tiny_gpt2_dir, corpus_file, CONFIG, env, tmp_path)
    assert second["stages"]["metrics"]["status"] == "cached"
    layer = "transformer.h.1.mlp.c_fc.weight"
    p = run_cli(["search", "layers", "--like", f"{first['audit_id']}:{layer}", "-k", "10", "--json"], env, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    hits = json.loads(p.stdout)
    assert (hits[0]["layer"], hits[0]["score"] > 0.9999) == (layer, True)
    other = [h for h in hits if h["audit_id"] != first["audit_id"]]
    assert other[0]["audit_id"] == second["audit_id"] and other[0]["layer"] == layer
    html = Path(second["report_uri"]).read_text()
    assert "Weights, curvature and similarity" in html and "linear CKA" in html

    # A later checkpoint of the same run (here: the same weights) compared by CKA to the first audit; the
    # weight shards are reused (only sensitivity settings changed), and the Fisher diagonal is stored in full.
    third = audit_json(
        tiny_gpt2_dir,
        corpus_file,
        CONFIG.replace("hutchinson_probes: 8", f"hutchinson_probes: 6\n  compare_audits: [{first['audit_id']}]"),
        env,
        tmp_path,
    )
    m3 = third["stages"]["metrics"]
    assert m3["status"] == "completed" and m3["details"]["shards"] == m["details"]["shards"]
    assert len(m3["details"]["shards"]) == 4
    across = m3["details"]["cka"]["audits"][first["audit_id"]]
    assert set(across) == set(cka["layers"]) and all(abs(v - 1) < 1e-6 for v in across.values())
    from safetensors.numpy import load_file

    fisher = load_file(Path(m3["artifacts"]["fisher"]))
    for name, r in {r["name"]: r for r in m3["details"]["sensitivity"]}.items():
        assert abs(float(fisher[name].astype(np.float64).sum()) - r["fisher_trace"]) <= 1e-5 * max(
            r["fisher_trace"], 1e-12
        )
    html = Path(third["report_uri"]).read_text()
    assert "Fisher diagonal" in html and "against other checkpoints" in html and first["audit_id"] in html

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("cka_tokens: 256", "cka_tokens: 256\n  compare_audits: [no-such-audit]"))
    p = run_cli(
        [
            "run",
            "--model",
            str(tiny_gpt2_dir),
            "--dataset",
            str(corpus_file),
            "--config",
            str(bad),
            "--stages",
            "metrics",
        ],
        env,
        tmp_path,
    )
    assert p.returncode != 0 and "no audit 'no-such-audit'" in p.stderr and "microscope list" in p.stderr
