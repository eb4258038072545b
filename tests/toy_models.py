"""Plain nn.Modules importable by path ('tests.toy_models:ToyLM'), for bare state-dict checkpoints."""

from __future__ import annotations

import torch
from torch import nn


class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class ToyLM(nn.Module):
    """Embedding, a stack of residual blocks, an unembedding: takes token ids like an LM."""

    def __init__(self, vocab: int = 512, d: int = 16, n_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.unembed = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.unembed(x)


class ToyConvNet(nn.Module):
    """Convolutions only: nothing a Linear quantizer can convert."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.embed = nn.Embedding(512, channels)
        self.blocks = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=1) for _ in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)
        for b in self.blocks:
            x = x + b(x)
        return x.transpose(1, 2)


def tiny_lightning_module():
    """A LightningModule around a 2-layer MLP at `.model` (what the Lightning callback exports)."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()
