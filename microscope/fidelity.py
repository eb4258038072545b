"""How far a quantized variant's outputs are from the full-precision model's.

Logit statistics follow llama.cpp's `--kl-divergence` report: KL(p_fp ‖ p_q) of next-token
distributions (mean and 99th percentile), top-1 agreement, mean |Δp| of the reference token and the
change in perplexity. Activation drift is cosine similarity and relative error per hook point.
`fidelity` (token windows) and `image_fidelity` (a classifier's images) run both models and return them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from microscope.figures import Figure, Undefined
from microscope.trace import capture, hook_name

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


def _logits(out: Any) -> Any:
    return getattr(out, "logits", None)


def fidelity(
    fp_model: Any, q_model: Any, ids: np.ndarray, points: dict[tuple[int, str], str], batch: int, causal: bool
) -> tuple[dict[str, Figure], dict[str, dict[str, float]]]:
    """Logit statistics (undefined where the model has no logits) and per-hook activation drift on `ids`."""
    logit_fid, drift = LogitFidelity(), ActivationDrift()
    names = {lh: hook_name(*lh) for lh in points}
    device = next(fp_model.parameters()).device
    for lo in range(0, len(ids), batch):
        x = torch.from_numpy(ids[lo : lo + batch].astype(np.int64)).to(device)
        with torch.inference_mode(), capture(fp_model, points) as acts_fp:
            out_fp = fp_model(input_ids=x)
        with torch.inference_mode(), capture(q_model, points) as acts_q:
            out_q = q_model(input_ids=x)
        for lh in points:
            drift.update(names[lh], acts_fp[lh].float().cpu(), acts_q[lh].float().cpu())
        lf, lq = _logits(out_fp), _logits(out_q)
        x = x.cpu()  # the statistics are NumPy: compared on the CPU
        lf, lq = (None if t is None else t.cpu() for t in (lf, lq))
        if lf is not None and lq is not None:
            if causal:  # position t predicts token t+1
                logit_fid.update(lf[:, :-1].float(), lq[:, :-1].float(), x[:, 1:])
            else:
                logit_fid.update(lf.float(), lq.float(), None)
    return logit_fid.summary(), drift.summary()


def _classify(model: Any, x: Any) -> Any:
    """Float32 logits on the CPU; the images go in at the model's own dtype (fp16 and bf16 variants)."""
    from microscope.robustness.surfaces import float_dtype

    return model(x.to(float_dtype(model))).float().cpu()


def image_fidelity(fp_model: Any, q_model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """A classifier's fidelity on its images: class-distribution KL, top-1 agreement, |Δp| of the true
    class and Δ perplexity of the labels, plus the accuracy of both models."""
    lf, acc = LogitFidelity(), {"fp": 0, "q": 0}
    for lo in range(0, len(x), 256):
        xb, yb = torch.from_numpy(x[lo : lo + 256]), torch.from_numpy(y[lo : lo + 256])
        device = next(fp_model.parameters()).device
        with torch.inference_mode():
            out_fp, out_q = (_classify(m, xb.to(device)) for m in (fp_model, q_model))
        lf.update(out_fp, out_q, yb)
        acc["fp"] += int((out_fp.argmax(-1) == yb).sum())
        acc["q"] += int((out_q.argmax(-1) == yb).sum())
    return lf.summary() | {"accuracy_fp": acc["fp"] / len(x), "accuracy_q": acc["q"] / len(x)}
