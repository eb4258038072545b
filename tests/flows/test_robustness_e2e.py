"""The robustness stage through the pipeline: the digits CNN (pixels) with a quantized variant, AutoAttack
identical to calling pyautoattack directly on the same samples, curves in MLflow per variant; and a tiny
causal LM (embeddings) whose SAE features that move most under attack are listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import audit_json, cli_env


def test_digits_cnn_robustness(finished_vision: dict, vision_root: Path, digits_cnn: tuple[Path, Path]) -> None:
    import torch
    from mlflow import MlflowClient
    from pyautoattack import AutoAttack
    from safetensors.torch import load_file

    from microscope.models.vision import DigitsCNN

    rec = finished_vision  # tests/conftest.py VISION_AUDIT
    st = rec["stages"]
    assert st["trace"]["status"] == "skipped" and "image dataset" in st["trace"]["details"]["reason"]
    assert st["metrics"]["status"] == "completed" and st["metrics"]["details"]["sensitivity"]  # CE on images
    q = rec["variants"]["torch-int8"]["quantize"]["metrics"]
    assert q["accuracy_fp"] >= 0.95 and abs(q["accuracy_q"] - q["accuracy_fp"]) < 0.05

    fp = st["robustness"]
    assert fp["status"] == "completed" and fp["details"]["surface"] == "pixels"
    curves = fp["details"]["curves"]
    assert curves["eps"] == [0.0, 0.0314, 0.1255, 0.251] and curves["pgd"][0] == curves["clean"][0] >= 0.9
    assert all(a >= b for a, b in zip(curves["pgd"], curves["pgd"][1:], strict=False)) and curves["pgd"][-1] < 0.5
    aa = fp["details"]["autoattack"][0]
    assert aa["version"] == "standard" and aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]

    # The same samples through pyautoattack directly: the same robust accuracy, sample for sample.
    d = np.load(digits_cnn[1])
    idx = sorted(np.random.default_rng(0).permutation(len(d["x"]))[:32])
    model = DigitsCNN()
    model.load_state_dict(load_file(str(digits_cnn[0])))
    x, y = torch.from_numpy(d["x"][idx]), torch.from_numpy(d["y"][idx])
    _, y_adv = AutoAttack(model.eval(), norm="Linf", eps=0.0627, version="standard", seed=0).run_standard_evaluation(
        x, y, batch_size=32
    )
    assert aa["robust"] == (y_adv == y).sum().item() / 32 and aa["robust_flags"] == (y_adv == y).tolist()

    var = rec["variants"]["torch-int8"]["robustness"]
    assert var["status"] == "completed" and var["details"]["curves"]["eps"] == curves["eps"]
    client = MlflowClient(f"sqlite:///{vision_root / 'home' / 'mlflow.db'}")
    for r in (fp, var):
        hist = client.get_metric_history(r["mlflow_run_id"], "pgd_accuracy")
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == r["details"]["curves"]["pgd"]
    html = Path(rec["report_uri"]).read_text()
    assert "<h2>Robustness</h2>" in html and "AutoAttack Linf" in html and "torch-int8" in html


TEXT = """
dataset:
  seq_len: 32
  max_tokens: 4096
quantize:
  formats: [torch-int8]
  eval_windows: 4
trace:
  layers: [1]
  hooks: [resid]
sae:
  hooks: [blocks.1.hook_resid_post]
  k: 4
  expansion: 4
  batch_size: 256
  epochs: 2
  buffer_tokens: 2048
metrics:
  sensitivity: false
robustness:
  samples: 8
  batch_size: 8
  version: custom
  attacks: [apgd-ce]
  context_tokens: 16
  sweep: [0.0, 0.05, 0.3]
  pgd_steps: 5
  feature_shifts: 5
"""


def test_causal_lm_robustness_links_to_sae_features(
    prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, prefect_api)
    rec = audit_json(tiny_gpt2_dir, corpus_file, TEXT, env, tmp_path)
    r = rec["stages"]["robustness"]
    assert r["status"] == "completed", r["error"]
    d = r["details"]
    assert d["surface"] == "embeddings" and d["label"] == "clean prediction" and d["curves"]["clean"] == [1.0]
    assert d["curves"]["eps_units"][1] > 0 and d["autoattack"][0]["eps"] == 0.02  # the embedding default
    shifts = d["feature_shifts"]["blocks.1.hook_resid_post"]
    assert len(shifts) == 5 and shifts[0]["mean_abs_shift"] >= shifts[-1]["mean_abs_shift"] > 0
    assert all(isinstance(c, str) for f in shifts for c in f["top_contexts"])
    assert set(d["layer_shifts"]) == {"blocks.1.hook_resid_post"} and d["layer_shifts"]["blocks.1.hook_resid_post"] > 0
    assert rec["variants"]["torch-int8"]["robustness"]["status"] == "completed"
    html = Path(rec["report_uri"]).read_text()
    assert "move most under attack" in html and "Brittle layers" in html
