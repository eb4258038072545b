"""Training an SAE with PyTorch Lightning from any stream of activation batches.

The module knows nothing of Parquet, MLflow or Prefect: it takes batches, keeps the decoder at unit
norm, tracks dead latents (no activation within `dead_window` tokens, fed to the aux-k loss) and
records its curves; checkpoints make a killed fit resume to the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from microscope.sae.architectures import SAE
from microscope.sae.data import ShuffledBatches

# Lightning's own banner and "fit stopped" lines (its handler, at INFO) say nothing the SAE stage's summary
# does not; its warnings still show
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


class SAEModule(L.LightningModule):
    """One SAE, or several trained from one pass over the data (a batch is then a tuple with one tensor
    per SAE, rows aligned). Their parameters are disjoint, so each trains exactly as it would alone."""

    def __init__(
        self,
        sae: SAE | list[SAE],
        lr: float,
        dead_window: int,
        lr_warmup_steps: int = 0,
        log_every: int = 10,
        resample_every: int = 0,
    ):
        super().__init__()
        self.saes = nn.ModuleList(sae if isinstance(sae, list) else [sae])
        self.lr = lr
        self.dead_window, self.lr_warmup_steps, self.log_every = dead_window, lr_warmup_steps, log_every
        self.resample_every = resample_every  # ReLU family only: no aux-k loss there (0 = never)
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.resampled = 0
        for i, one in enumerate(self.saes):
            self.register_buffer(f"tokens_since_fired_{i}", torch.zeros(one.d_sae, dtype=torch.long))
        self.curves: list[list[dict[str, float]]] = [[] for _ in self.saes]

    @property
    def sae(self) -> SAE:
        return self.saes[0]

    @property
    def tokens_since_fired(self) -> torch.Tensor:
        return self.tokens_since_fired_0

    def dead_mask(self, i: int = 0) -> torch.Tensor:
        return getattr(self, f"tokens_since_fired_{i}") >= self.dead_window

    def training_step(self, batch: torch.Tensor | tuple[torch.Tensor, ...], _idx: int) -> torch.Tensor:
        xs = batch if isinstance(batch, tuple | list) else (batch,)
        total = 0.0
        for i, (sae, x) in enumerate(zip(self.saes, xs, strict=True)):
            total = total + self._step_one(i, sae, x.float())
        return total

    def _step_one(self, i: int, sae: SAE, x: torch.Tensor) -> torch.Tensor:
        out = sae(x)
        parts = sae.loss(x, out, self.global_step, self.dead_mask(i))
        with torch.no_grad():
            if self.resample_every and sae.architecture == "relu":
                self._last[i] = (x.detach(), (x - out.recon).detach())
            counter = getattr(self, f"tokens_since_fired_{i}")
            counter += x.shape[0]
            counter[(out.acts > 0).any(0)] = 0
            if self.global_step % self.log_every == 0:
                var = (x - x.mean(0)).pow(2).sum()
                row = {
                    "step": float(self.global_step),
                    "loss": float(parts["total"]),
                    "mse": float(parts["mse"]),
                    "fvu": float((out.recon - x).pow(2).sum() / var.clamp_min(1e-12)),
                    "l0": float((out.acts > 0).float().sum(-1).mean()),
                    "dead_frac": float(self.dead_mask(i).float().mean()),
                }
                self.curves[i].append(row)
                prefix = f"sae{i}/" if len(self.saes) > 1 else ""
                self.log_dict({prefix + k: v for k, v in row.items() if k != "step"}, prog_bar=i == 0, on_step=True)
        return parts["total"]

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for sae in self.saes:
            sae.remove_parallel_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (the checkpoint) run before the module's batch-end
        # hook, so a checkpoint would hold un-normalised rows and a resumed fit would drift.
        for sae in self.saes:
            sae.normalize_decoder()
        if self.resample_every and (self.global_step + 1) % self.resample_every == 0:
            opt = self.optimizers()
            for i, sae in enumerate(self.saes):
                if sae.architecture == "relu":
                    self.resample_dead(opt.optimizer if hasattr(opt, "optimizer") else opt, i)

    @torch.no_grad()
    def resample_dead(self, optimizer: Any, i: int = 0) -> int:
        """Anthropic-style resampling: each dead latent gets the direction of a badly reconstructed input
        (chosen with probability ∝ squared error), a small encoder row along it, zero bias, and fresh
        Adam moments for what changed."""
        sae = self.saes[i]
        dead = self.dead_mask(i).nonzero().flatten()
        if dead.numel() == 0 or i not in self._last:
            return 0
        x, err = self._last[i]
        loss = err.pow(2).sum(-1)
        gen = torch.Generator().manual_seed(int(self.global_step))
        pick = torch.multinomial(loss.cpu() + 1e-12, dead.numel(), replacement=True, generator=gen).to(x.device)
        dirs = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [n_dead, d_in]
        alive = ~self.dead_mask(i)
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec.data[dead] = dirs
        sae.W_enc.data[:, dead] = dirs.T * enc_norm * 0.2
        sae.b_enc.data[dead] = 0
        for p, rows in ((sae.W_dec, (dead, slice(None))), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0
        getattr(self, f"tokens_since_fired_{i}")[dead] = 0
        self.resampled += int(dead.numel())
        return int(dead.numel())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.saes.parameters(), lr=self.lr, betas=(0.9, 0.999))
        warm = max(self.lr_warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["microscope_curves"] = self.curves

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("microscope_curves")
        if saved is not None:
            self.curves = [list(c) for c in saved]


class ActivationDataModule(L.LightningDataModule):
    """Lightning's view of a ShuffledBatches stream: batches are already formed, so no collation."""

    def __init__(self, data: ShuffledBatches):
        super().__init__()
        self.data = data

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=None)


@dataclass
class FitResult:
    steps: int
    curves: list[dict[str, float]] = field(default_factory=list)  # the first (or only) SAE's
    lr: float = 0.0
    resumed_from_step: int = 0
    all_curves: list[list[dict[str, float]]] = field(default_factory=list)  # one list per SAE


def fit(
    module: SAEModule,
    data: ShuffledBatches,
    steps: int,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 200,
    precision: str | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> FitResult:
    """Train for `steps` optimiser steps; resumes from `checkpoint_dir/last.ckpt` when there is one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cbs = list(callbacks or [])
    ckpt_path = None
    if checkpoint_dir is not None:
        cbs.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir,
                save_last=True,
                every_n_train_steps=checkpoint_every,
                save_top_k=0,
                enable_version_counter=False,
            )
        )
        last = checkpoint_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
    from microscope.models.loading import compute_device

    gpu = compute_device().startswith("cuda")  # the settings decide, as for every other stage
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision=precision or ("bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"),
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=cbs,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    data.start_batch = lambda: trainer.global_step  # a resumed fit skips the batches already trained on
    resumed = 0
    if ckpt_path:
        resumed = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"])
    trainer.fit(module, datamodule=ActivationDataModule(data), ckpt_path=ckpt_path)
    return FitResult(
        steps=trainer.global_step,
        curves=module.curves[0],
        lr=module.lr,
        resumed_from_step=resumed,
        all_curves=module.curves,
    )


def find_lr(module: SAEModule, data: ShuffledBatches, max_lr: float = 1e-1, num_training: int = 60) -> float:
    """Lightning's learning-rate finder (`sae.lr: auto`)."""
    from lightning.pytorch.tuner import Tuner

    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=num_training,
    )
    result = Tuner(trainer).lr_find(
        module,
        datamodule=ActivationDataModule(data),
        min_lr=1e-6,
        max_lr=max_lr,
        num_training=num_training,
        update_attr=False,
    )
    suggestion = result.suggestion() if result is not None else None
    return float(suggestion) if suggestion and np.isfinite(suggestion) else module.lr
