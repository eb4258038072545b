"""SAE files round-trip through a loader written against the SAELens layout, independent of ours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from microscope.sae import io
from microscope.sae.architectures import build

SAELENS_KEYS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "metadata",
}


def reference_reconstruction(folder: Path, x: np.ndarray) -> np.ndarray:
    """What an SAE tool computes from the two files: no code of ours involved."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        acts = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    elif cfg["architecture"] == "jumprelu":
        acts = pre * (pre > w["threshold"])
    else:
        acts = np.maximum(pre, 0)
    return acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_round_trip_applies_to_raw_activations(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = build(arch, 8, 24, k=3) if "topk" in arch else build(arch, 8, 24)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32) * 5
    scale = 0.37  # the SAE was trained on scale·x
    if arch == "batchtopk":
        sae.train()
        sae(torch.from_numpy(x * scale))  # estimates the inference threshold
    sae.eval()
    with torch.no_grad():
        ours = sae(torch.from_numpy(x * scale)).recon.double().numpy() / scale
    files = io.save(sae, tmp_path / "sae", scale, {"hook_name": "blocks.2.hook_resid_post", "model_name": "tiny"})
    cfg = json.loads(files[1].read_text())
    assert SAELENS_KEYS <= set(cfg) and cfg["d_in"] == 8 and cfg["d_sae"] == 24
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["metadata"]["activation_scale"] == scale
    np.testing.assert_allclose(
        reference_reconstruction(tmp_path / "sae", x.astype(np.float64)), ours, rtol=1e-4, atol=1e-4
    )
    loaded = io.load(tmp_path / "sae")
    np.testing.assert_allclose(loaded(torch.from_numpy(x)).double().numpy(), ours, rtol=1e-4, atol=1e-4)
