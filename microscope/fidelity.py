"""How far a quantized variant's outputs are from the full-precision model's.

Logit statistics follow llama.cpp's `--kl-divergence` report: KL(p_fp ‖ p_q) of next-token
distributions (mean and 99th percentile), top-1 agreement, mean |Δp| of the reference token and the
change in perplexity. Activation drift is cosine similarity and relative error per hook point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from microscope.figures import Figure, Undefined

NO_LOGITS = (
    "the model has no output logits (no head): there is no output distribution to compare, so logit "
    "fidelity is undefined"
)
NO_TARGETS = (
    "these logits are not next-token predictions (an encoder's head): with no reference token, its Δp and "
    "perplexity are undefined"
)
LOGIT_FIGURES = ("kl_mean", "kl_p99", "top1_agreement")
TARGET_FIGURES = ("ref_token_abs_dp_mean", "ppl_fp", "ppl_q", "delta_ppl")


@dataclass
class LogitFidelity:
    """Accumulates per-token figures over batches; `summary()` reduces them."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1_same: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)
    nll_fp: list[np.ndarray] = field(default_factory=list)
    nll_q: list[np.ndarray] = field(default_factory=list)

    def update(self, logits_fp: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor | None) -> None:
        """logits [..., vocab] of the same positions; targets [...] the reference next tokens (or None)."""
        lp = torch.log_softmax(logits_fp.double(), dim=-1).reshape(-1, logits_fp.shape[-1])
        lq = torch.log_softmax(logits_q.double(), dim=-1).reshape(-1, logits_q.shape[-1])
        p = lp.exp()
        self.kl.append((p * (lp - lq)).sum(-1).clamp_min(0).numpy())  # KL(p_fp ‖ p_q) per token, [n]
        self.top1_same.append((lp.argmax(-1) == lq.argmax(-1)).numpy())
        if targets is not None:
            t = targets.reshape(-1, 1)
            ref_fp, ref_q = lp.gather(1, t)[:, 0], lq.gather(1, t)[:, 0]
            self.dp.append((ref_q.exp() - ref_fp.exp()).abs().numpy())
            self.nll_fp.append((-ref_fp).numpy())
            self.nll_q.append((-ref_q).numpy())

    def summary(self) -> dict[str, Figure]:
        """The figures, or why each is undefined: no logits were compared at all (the model has none), or
        none came with reference tokens."""
        if not self.kl:
            return dict.fromkeys(LOGIT_FIGURES + TARGET_FIGURES, Undefined(NO_LOGITS))
        kl = np.concatenate(self.kl)
        out: dict[str, Figure] = {
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(np.concatenate(self.top1_same).mean()),
        }
        if self.dp:
            ppl_fp = float(np.exp(np.concatenate(self.nll_fp).mean()))
            ppl_q = float(np.exp(np.concatenate(self.nll_q).mean()))
            out |= {
                "ref_token_abs_dp_mean": float(np.concatenate(self.dp).mean()),
                "ppl_fp": ppl_fp,
                "ppl_q": ppl_q,
                "delta_ppl": ppl_q - ppl_fp,
            }
        else:
            out |= dict.fromkeys(TARGET_FIGURES, Undefined(NO_TARGETS))
        return out


@dataclass
class ActivationDrift:
    """Per hook point: mean cosine(fp, q) over tokens and relative error ‖q − fp‖ / ‖fp‖."""

    cos_sum: dict[str, float] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    diff_sq: dict[str, float] = field(default_factory=dict)
    ref_sq: dict[str, float] = field(default_factory=dict)

    def update(self, name: str, fp: torch.Tensor, q: torch.Tensor) -> None:
        a = fp.double().reshape(-1, fp.shape[-1])  # [tokens, d]
        b = q.double().reshape(-1, q.shape[-1])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
        self.cos_sum[name] = self.cos_sum.get(name, 0.0) + float(cos.sum())
        self.n[name] = self.n.get(name, 0) + a.shape[0]
        self.diff_sq[name] = self.diff_sq.get(name, 0.0) + float(((b - a) ** 2).sum())
        self.ref_sq[name] = self.ref_sq.get(name, 0.0) + float((a**2).sum())

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {
                "cosine": self.cos_sum[k] / self.n[k],
                "rel_error": float(np.sqrt(self.diff_sq[k] / max(self.ref_sq[k], 1e-300))),
            }
            for k in sorted(self.n)
        }
