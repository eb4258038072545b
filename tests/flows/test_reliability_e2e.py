"""The reliability stage through the pipeline: the digits CNN (calibration, temperature, OOD, corruptions, per
variant; recomputed here from the model on the recorded samples with torchmetrics and scikit-learn), a tiny
causal LM (next-token calibration, window-level OOD, cached on a second run), and a wrong OOD dataset refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_env, run_cli


def test_digits_cnn_reliability(finished_vision: dict, vision_root: Path, digits_cnn: tuple[Path, Path]) -> None:
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score
    from torchmetrics.functional.classification import multiclass_calibration_error

    from microscope.models.vision import DigitsCNN

    rec = finished_vision  # tests/conftest.py VISION_AUDIT: reliability at its defaults
    r = rec["stages"]["reliability"]
    assert r["status"] == "completed", r["error"]
    d, m = r["details"], r["metrics"]
    results = json.loads(Path(r["artifacts"]["results"]).read_text())
    fit, ev = results["sample_indices"]["fit"], results["sample_indices"]["eval"]
    assert d["n"] == len(fit) + len(ev) == 64 and not set(fit) & set(ev)  # all 64 images: fewer than 1,000

    # the model's logits on the recorded samples, recomputed here
    data = np.load(digits_cnn[1])
    model = DigitsCNN()
    model.load_state_dict(load_file(str(digits_cnn[0])))
    idx = fit + ev
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(data["x"][idx])).double()
    y = torch.from_numpy(data["y"][idx]).long()
    probs = logits.softmax(-1)
    for norm, key in (("l1", "ece"), ("max", "mce"), ("l2", "rms_ce")):
        ref = multiclass_calibration_error(probs.float(), y, num_classes=10, n_bins=15, norm=norm).item()
        assert abs(m[key] - ref) < 1e-5, (key, m[key], ref)  # torchmetrics computes in float32
    assert m["accuracy"] == pytest.approx((logits.argmax(-1) == y).double().mean().item(), abs=1e-12)
    ts = d["temperature"]
    assert ts["temperature"] > 0 and ts["before"]["accuracy"] == ts["after"]["accuracy"]  # T keeps the argmax

    # OOD: MSP on the rotated and inverted evaluation images, against scikit-learn
    x_ev = data["x"][ev]
    shifted = (1.0 - np.rot90(x_ev, k=1, axes=(2, 3))).astype(np.float32)
    with torch.no_grad():
        msp_in = model(torch.from_numpy(x_ev)).double().softmax(-1).max(-1).values.numpy()
        msp_out = model(torch.from_numpy(np.ascontiguousarray(shifted))).double().softmax(-1).max(-1).values.numpy()
    labels = np.r_[np.ones(len(msp_in)), np.zeros(len(msp_out))]
    ref_auroc = roc_auc_score(labels, np.r_[msp_in, msp_out])
    assert d["ood"]["rotated-inverted"]["msp"]["auroc"] == pytest.approx(ref_auroc, abs=1e-9)
    assert set(d["ood"]) == {"rotated-inverted", "uniform-noise"}
    assert set(d["ood"]["uniform-noise"]) == {"msp", "energy", "mahalanobis", "knn"}
    assert d["knn_k"] == 1 and d["ood"]["uniform-noise"]["knn"]["auroc"] > 0.5  # k far below a class's size

    # corruptions: 16 kinds × 5 severities on the evaluation images; the clean accuracy is theirs
    c = d["corruptions"]
    assert len(c["accuracy"]) == 16 and all(set(by) == {"1", "2", "3", "4", "5"} for by in c["accuracy"].values())
    with torch.no_grad():
        clean = (model(torch.from_numpy(x_ev)).argmax(-1).numpy() == data["y"][ev]).mean()
    assert c["clean_accuracy"] == pytest.approx(clean, abs=1e-12) and c["n"] == len(ev)
    assert 0 <= m["mean_corruption_accuracy"] <= 1

    # randomized smoothing: each radius is σ·Φ⁻¹ of the Clopper-Pearson bound on its own counts (SciPy)
    from scipy.stats import beta, norm

    sm = results["smoothing"]["0.25"]
    assert sm["samples"] == 16 and sm["n"] == 200
    for n_a, pred, radius, ok in zip(sm["n_a"], sm["prediction"], sm["radius"], sm["correct"], strict=True):
        low = beta.ppf(0.001, n_a, 200 - n_a + 1) if n_a else 0.0
        assert (pred == -1) == (low < 0.5)
        assert radius == pytest.approx(0.25 * norm.ppf(low) if ok else 0.0, abs=1e-9)
    assert sm["certified_accuracy"]["0"] == pytest.approx(sum(sm["correct"]) / 16)
    assert m["certified_sigma25_r0"] == sm["certified_accuracy"]["0"] and "prediction" not in d["smoothing"]["0.25"]

    # the int8 variant on the same samples, its corruption errors relative to full precision
    var = rec["variants"]["torch-int8"]["reliability"]
    assert var["status"] == "completed" and var["details"]["n"] == d["n"]
    scores = var["details"]["corruption_scores"]
    assert scores["mean_corruption_accuracy"] == pytest.approx(var["metrics"]["mean_corruption_accuracy"])
    # MLflow: the diagram's per-bin accuracy as a history over the bins, the details as reliability.json
    client = MlflowClient(f"sqlite:///{vision_root / 'home' / 'mlflow.db'}")
    hist = sorted(client.get_metric_history(r["mlflow_run_id"], "reliability_bin_accuracy"), key=lambda x: x.step)
    diagram = d["calibration"]["diagram"]
    assert [h.value for h in hist] == [a for a in diagram["accuracy"] if a is not None]
    assert "reliability.json" in {f.path for f in client.list_artifacts(r["mlflow_run_id"])}
    html = Path(rec["report_uri"]).read_text()
    assert "<h2>Reliability</h2>" in html and "rotated-inverted" in html and "Common corruptions" in html


TEXT = """
dataset:
  seq_len: 32
  max_tokens: 4096
quantize:
  formats: [torch-int8]
  eval_windows: 4
reliability:
  samples: 300
  knn_k: 5
"""


def test_causal_lm_reliability_is_cached_and_refuses_a_wrong_ood_dataset(
    prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path, digits_cnn: tuple[Path, Path]
) -> None:
    env = cli_env(tmp_path, prefect_api)
    (tmp_path / "audit.yaml").write_text(TEXT)
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
    args += ["--stages", "ingest,quantize,reliability", "--json"]
    p = run_cli(args, env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    r = rec["stages"]["reliability"]
    assert r["status"] == "completed", r["error"]
    d = r["details"]
    assert d["n"] == 300 and d["n_fit"] == 150 and d["calibration"]["n"] == 300  # next-token positions
    assert set(d["ood"]) == {"shuffled-tokens", "python-source"}
    assert d["ood_sets"]["python-source"] > 0 and "corruptions" not in d  # text: no image corruptions
    assert 0 < r["metrics"]["temperature"] and "classwise_ece" in r["metrics"]
    assert rec["variants"]["torch-int8"]["reliability"]["details"]["n"] == 300

    again = run_cli(args, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["stages"]["reliability"]["status"] == "cached"

    # an image dataset as the OOD set of a text model: one line naming the fix, exit 2
    (tmp_path / "bad.yaml").write_text(TEXT + f"  ood_dataset: {digits_cnn[1]}\n")
    bad = run_cli([*args[:5], "--config", "bad.yaml", "--stages", "ingest,reliability"], env, tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert "reliability.ood_dataset" in last and "is an image dataset but the audit's model reads text" in last
