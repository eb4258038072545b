"""SAE files in the layout SAE tools read: `sae_weights.safetensors` + `cfg.json` (SAELens v6 names).

Training normalises activations by a scalar s (E‖s·x‖² = d_in); saving folds s into the weights, so the
files apply to raw activations (`normalize_activations: none`) and s is kept in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from microscope.sae.architectures import SAE, build

# Our architecture name -> the SAELens architecture the saved weights follow.
SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}


def folded_weights(sae: SAE, scale: float) -> dict[str, torch.Tensor]:
    """Weights for raw inputs x, given the SAE was trained on s·x (see module docstring)."""
    w = {
        "W_enc": sae.W_enc.detach() * scale,
        "W_dec": sae.W_dec.detach() / scale,
        "b_enc": sae.b_enc.detach().clone(),
        "b_dec": sae.b_dec.detach() / scale,
    }
    thr = sae.inference_threshold()
    if thr is not None:
        w["threshold"] = thr.detach()  # a threshold on pre-activations, which folding leaves unchanged
    return {k: v.float().contiguous().cpu() for k, v in w.items()}


def save(sae: SAE, folder: Path, scale: float, metadata: dict[str, Any]) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(folded_weights(sae, scale), folder / "sae_weights.safetensors")
    cfg = {
        "architecture": SAELENS_ARCH[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "microscope_architecture": sae.architecture,
            "activation_scale": scale,
            "hyperparameters": {k: v for k, v in sae.hp.items() if isinstance(v, int | float | str | bool)},
            **metadata,
        },
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return [folder / "sae_weights.safetensors", folder / "cfg.json"]


class LoadedSAE(torch.nn.Module):
    """An SAE read back from its files: encode/decode on raw activations."""

    def __init__(self, cfg: dict[str, Any], weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        for k, v in weights.items():
            self.register_buffer(k, v)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        arch = self.cfg["architecture"]
        if arch == "topk":
            vals, idx = pre.topk(self.cfg["k"], dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load(folder: Path) -> LoadedSAE:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    return LoadedSAE(cfg, load_file(str(folder / "sae_weights.safetensors")))


def rebuild(folder: Path) -> SAE:
    """A trainable SAE of the saved architecture, with the (folded) weights: for fine-tuning or tests."""
    loaded = load(folder)
    meta = loaded.cfg["metadata"]
    sae = build(meta["microscope_architecture"], loaded.cfg["d_in"], loaded.cfg["d_sae"], **meta["hyperparameters"])
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(loaded, name))
    return sae
