"""What the stages need of an audit's dataset, behind one interface: token windows of a text model or
labelled images of a classifier. The one modality branch is `open_data`; stages call the methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
from schemas.config import AuditConfig
from schemas.records import Architecture, StageRecord

from microscope import dataset as ds
from microscope.errors import InputError
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    from microscope.pruning import Calibration


CALIBRATION_WINDOWS = 32  # SNIP's one minibatch and Wanda's activations (Wanda uses 128 x 2048 tokens)
CALIBRATION_IMAGES = 128


class AuditData(ABC):
    kind: str
    activations: bool  # whether activations are traced (and SAEs trained) for this modality

    @abstractmethod
    def fidelity(
        self, fp_model: Any, q_model: Any, arch: Architecture, cfg: AuditConfig
    ) -> tuple[int, dict[str, Any], dict[str, dict[str, float]]]:
        """(evaluated tokens or images, logit statistics, per-hook activation drift) of a variant."""

    @abstractmethod
    def sensitivity_inputs(self, cfg: AuditConfig) -> tuple[np.ndarray, np.ndarray | None]:
        """(inputs, labels or None for next-token CE) for the loss-sensitivity estimates."""

    @abstractmethod
    def attack_inputs(self, surface: Any, cfg: AuditConfig) -> tuple[Any, Any, str, list[int]]:
        """(inputs on the attack surface, targets, what the targets are, dataset indices): the same
        seeded choice for every variant."""

    @abstractmethod
    def pruning_calibration(self, arch: Architecture, cfg: AuditConfig) -> Calibration:
        """SNIP's minibatch and Wanda's activation batches: the first samples (fidelity holds out the last)."""

    def _pick(self, n: int, cfg: AuditConfig) -> np.ndarray:
        return np.sort(np.random.default_rng(cfg.seed).permutation(n)[: cfg.robustness.samples])


class TextData(AuditData):
    kind, activations = "text", True

    def __init__(self, ingest: StageRecord, store: ArtifactStore):
        self.ids, _ = ds.read_tokens(store.local_path(ingest.details["tokens_key"]))

    def fidelity(self, fp_model: Any, q_model: Any, arch: Architecture, cfg: AuditConfig) -> Any:
        from microscope.fidelity import fidelity
        from microscope.trace import resolve_layers, resolve_points

        held_out = self.ids[-cfg.quantize.eval_windows :]
        points = resolve_points(
            arch.hook_points, resolve_layers(cfg.trace.layers, arch.n_layers), cfg.trace.hooks, arch.family
        )
        stats, drift = fidelity(fp_model, q_model, held_out, points, cfg.trace.batch_size, arch.is_causal)
        return int(held_out.size), stats, drift

    def pruning_calibration(self, arch: Architecture, cfg: AuditConfig) -> Calibration:
        import torch

        from microscope.pruning import Calibration

        n = max(1, min(CALIBRATION_WINDOWS, len(self.ids) - cfg.quantize.eval_windows))
        x = torch.from_numpy(self.ids[:n].astype(np.int64))
        batches = [{"input_ids": x[i : i + 8]} for i in range(0, n, 8)]
        what = f"the first {n} token windows"
        if not (arch.is_causal and arch.has_unembedding):
            return Calibration(None, batches, "an encoder without a head has no loss", what)

        def loss(model: Any) -> Any:
            ids = x.to(next(model.parameters()).device)
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        return Calibration(loss, batches, "", what + " (next-token cross-entropy)")

    def sensitivity_inputs(self, cfg: AuditConfig) -> tuple[np.ndarray, None]:
        return self.ids[-cfg.metrics.sensitivity_windows :], None

    def attack_inputs(self, surface: Any, cfg: AuditConfig) -> tuple[Any, Any, str, list[int]]:
        """Token contexts (the start of each chosen window) with the next token as a possible target."""
        import torch

        from microscope.robustness.surfaces import RetrievalSurface

        if len(self.ids) == 0:
            raise InputError("robustness: the dataset has no windows to attack; add text or lower dataset.seq_len")
        rc = cfg.robustness
        idx = self._pick(len(self.ids), cfg)
        ctx = min(rc.context_tokens, self.ids.shape[1] - 1)
        device = next(surface.model.parameters()).device
        windows = torch.from_numpy(self.ids[idx].astype(np.int64)).to(device)
        x = surface.inputs(windows[:, :ctx])
        if isinstance(surface, RetrievalSurface):
            surface.set_anchors(x, rc.batch_size)
            return (
                x,
                torch.arange(len(x), device=device),
                "own clean embedding among the samples (retrieval)",
                idx.tolist(),
            )
        if rc.label == "dataset":
            return x, windows[:, ctx], "dataset next token", idx.tolist()
        with torch.no_grad():
            y = torch.cat([surface(x[i : i + rc.batch_size]).argmax(-1) for i in range(0, len(x), rc.batch_size)])
        return x, y, "clean prediction", idx.tolist()


class ImageData(AuditData):
    kind, activations = "images", False

    def __init__(self, ingest: StageRecord, store: ArtifactStore):
        from microscope.images import load_images

        self.x, self.y = load_images(ingest, store)

    def fidelity(self, fp_model: Any, q_model: Any, arch: Architecture, cfg: AuditConfig) -> Any:
        from microscope.fidelity import image_fidelity

        return len(self.x), image_fidelity(fp_model, q_model, self.x, self.y), {}

    def sensitivity_inputs(self, cfg: AuditConfig) -> tuple[np.ndarray, np.ndarray]:
        k = 32 * cfg.metrics.sensitivity_windows  # CE on the last images, 32 per window asked
        return self.x[-k:], self.y[-k:]

    def pruning_calibration(self, arch: Architecture, cfg: AuditConfig) -> Calibration:
        import torch

        from microscope.pruning import Calibration

        n = min(CALIBRATION_IMAGES, len(self.x))
        x, y = torch.from_numpy(self.x[:n]), torch.from_numpy(self.y[:n]).long()

        def loss(model: Any) -> Any:
            device = next(model.parameters()).device
            return torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))

        batches = [x[i : i + 64] for i in range(0, n, 64)]
        return Calibration(loss, batches, "", f"the first {n} images (cross-entropy with their labels)")

    def attack_inputs(self, surface: Any, cfg: AuditConfig) -> tuple[Any, Any, str, list[int]]:
        import torch

        idx = self._pick(len(self.x), cfg)
        device = next(surface.model.parameters()).device
        x, y = torch.from_numpy(self.x[idx]).to(device), torch.from_numpy(self.y[idx]).to(device)
        return x, y, "dataset labels", idx.tolist()


def open_data(ingest: StageRecord, store: ArtifactStore) -> AuditData:
    return ImageData(ingest, store) if ingest.details.get("modality") == "images" else TextData(ingest, store)
