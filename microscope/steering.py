"""Steering a running model through its SAE features: add a feature's decoder direction to the residual
stream, or clamp the feature's activation, and compare the clean and edited model.

α is in units of the feature's max activation (the audit's features table), so `341=+4` means "four
times as much of feature 341 as it ever showed" whatever the feature's scale. A clamp re-adds the SAE's
error term (h − decode(encode(h))) so that only the clamped feature changes, not the reconstruction
error the SAE would otherwise throw away. torch stays inside functions: the CLI imports this module and
`microscope --help` must stay fast.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from microscope.sae.io import LoadedSAE

Positions = Literal["all", "prompt"] | tuple[int, int]  # a token range is [start, end)
EDIT_SYNTAX = "FEATURE=+ALPHA or FEATURE=-ALPHA adds, FEATURE=ALPHA clamps (e.g. 341=+4, 12=0)"
_EDIT_RE = re.compile(r"^\s*(\d+)\s*=\s*([+-]?)\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*$")
CLEAN_CACHE = 16  # prompts whose clean pass is kept, so moving an α slider reruns only the edited pass


@dataclass(frozen=True)
class Edit:
    feature: int
    mode: Literal["add", "clamp"]
    alpha: float  # in units of the feature's max activation


def parse_edit(text: str) -> Edit:
    """`341=+4` / `341=-2.5` add ±α (a sign means add); `12=3` clamps to 3× the max activation, `12=0`
    ablates."""
    m = _EDIT_RE.match(text)
    if m is None:
        raise ValueError(f"bad edit {text!r}: {EDIT_SYNTAX}")
    feature, sign, number = int(m.group(1)), m.group(2), float(m.group(3))
    return Edit(feature, "add", -number if sign == "-" else number) if sign else Edit(feature, "clamp", number)


def _position_mask(positions: Positions, offset: int, length: int, prompt_len: int) -> torch.Tensor:
    """Which of the `length` tokens starting at absolute position `offset` are edited: bool [length]."""
    import torch

    named = {"all": (0, 1 << 62), "prompt": (0, prompt_len)}
    start, end = named[positions] if isinstance(positions, str) else positions
    pos = torch.arange(offset, offset + length)
    return (pos >= start) & (pos < end)


class _EditHook:
    """A forward hook on the SAE's module: edits the hidden state at the chosen positions and records,
    per edited token, ‖Δh‖ and each edited feature's activation before and after.

    `offset` is the absolute position of the first token of the next call, so incremental decoding with
    a KV cache (one new token per call) edits the right positions."""

    def __init__(self, steerer: Steerer, plan: _Plan, positions: Positions, prompt_len: int):
        self.s, self.plan, self.positions, self.prompt_len = steerer, plan, positions, prompt_len
        self.offset = 0
        # per call: ‖Δh‖ [n], the edited features' activations before and after [n, n_feat], positions [n]
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, _m: nn.Module, _i: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out  # [B, T, d]: blocks may return (hidden, ...)
        t = h.shape[1]
        mask = _position_mask(self.positions, self.offset, t, self.prompt_len).to(h.device)
        self.offset += t
        if not bool(mask.any()):
            return None  # None keeps the module's output as it is
        rows = h[:, mask].float()  # [B, n, d]
        new = self.s._apply(rows, self.plan)
        feats, encode = self.plan.features, self.s.sae.encode
        where = mask.nonzero().squeeze(1).cpu() + (self.offset - t)
        shift = (new - rows).norm(dim=-1).reshape(-1)  # rows are batch-major, hence where.repeat
        before, after = (encode(x)[..., feats].reshape(-1, len(feats)).cpu() for x in (rows, new))
        self.records.append((shift.cpu(), before, after, where.repeat(h.shape[0])))
        h = h.clone()
        h[:, mask] = new.to(h.dtype)  # only the edited positions change; the others keep their bits
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def summary(self) -> dict[str, Any]:
        import torch

        if not self.records:
            return {"residual_shift": 0.0, "edited_positions": [], "features": []}
        shift, before, after, where = (torch.cat(x) for x in zip(*self.records, strict=True))
        rows = _feature_rows(self.plan.features, before, after)
        return {"residual_shift": float(shift.double().mean()), "edited_positions": where.tolist(), "features": rows}


def _feature_rows(features: list[int], before: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
    """Per edited feature, its activations [n] at the edited tokens before and after the edit."""
    rows = []
    for j, f in enumerate(features):
        b, a = before[:, j].double(), after[:, j].double()  # the mean of none is NaN
        rows.append({"feature": f, "before": b.tolist(), "after": a.tolist()})
        rows[-1] |= {"before_mean": float(b.mean()), "after_mean": float(a.mean())}
    return rows


@dataclass
class _Plan:  # edits resolved to tensors on the model's device
    features: list[int]  # every edited feature, in order of first mention (for the before/after report)
    clamp_idx: torch.Tensor | None  # [n_clamp] feature indices
    clamp_val: torch.Tensor | None  # [n_clamp] target activations α·max_act
    add: torch.Tensor | None  # [d_in] Σ α·max_act·W_dec[i]


class Steerer:
    """Edits `module_path`'s output through the SAE's features. The model is never modified: hooks live
    only for one call (removed also on exceptions) and the train/eval mode is restored after it."""

    def __init__(self, model: nn.Module, sae: LoadedSAE, module_path: str, max_acts: np.ndarray, causal: bool):
        self.model, self.module_path, self.causal = model, module_path, causal
        self.module = dict(model.named_modules())[module_path]  # KeyError names a wrong path
        self.device = next(model.parameters()).device
        self.sae = sae.to(self.device)  # moves the SAE's buffers in place; the model stays as it is
        self.max_acts = np.asarray(max_acts, dtype=np.float64)
        d_sae = self.sae.W_dec.shape[0]
        if self.max_acts.shape != (d_sae,):
            raise ValueError(f"max_acts has shape {self.max_acts.shape}, expected ({d_sae},): one per SAE feature")
        self._clean: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    def _plan(self, edits: Sequence[Edit]) -> _Plan | None:
        """The edits as tensors, or None where they change nothing (no edits, or only +0 adds), so the
        caller can skip the hook and stay bit-identical to the clean pass."""
        import torch

        d_sae = len(self.max_acts)
        features: list[int] = []
        clamps: dict[int, float] = {}
        add: torch.Tensor | None = None
        for e in edits:
            if not 0 <= e.feature < d_sae:
                raise ValueError(f"feature {e.feature} is out of range: the SAE has {d_sae} features")
            m = self.max_acts[e.feature]
            dead = not np.isfinite(m) or m <= 0
            if e.mode == "add":
                if dead:
                    raise ValueError(f"feature {e.feature} never fired (max activation {m}): nothing to scale α by")
                if e.alpha == 0:
                    continue  # +0 is no edit at all
                direction = self.sae.W_dec[e.feature].float() * float(e.alpha * m)  # [d_in]
                add = direction if add is None else add + direction
            elif e.mode == "clamp":
                if e.alpha < 0:
                    raise ValueError(f"clamp of feature {e.feature} to {e.alpha}: activations are ≥ 0")
                if e.alpha != 0 and dead:
                    raise ValueError(f"feature {e.feature} never fired (max activation {m}): only a clamp to 0 works")
                if e.feature in clamps:
                    raise ValueError(f"feature {e.feature} is clamped twice")
                clamps[e.feature] = e.alpha * m if e.alpha != 0 else 0.0
            else:
                raise ValueError(f"edit mode {e.mode!r}: expected 'add' or 'clamp'")
            if e.feature not in features:
                features.append(e.feature)
        if add is None and not clamps:
            return None
        idx = torch.tensor(list(clamps), dtype=torch.long, device=self.device) if clamps else None
        val = torch.tensor(list(clamps.values()), dtype=torch.float32, device=self.device) if clamps else None
        return _Plan(features, idx, val, add)

    def _apply(self, h: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Edited hidden states [..., d_in] (float32). Clamps first, all in one encode/decode, then adds."""
        if plan.clamp_idx is not None:
            f = self.sae.encode(h)  # [..., d_sae]
            error = h - self.sae.decode(f)  # what the SAE does not explain, kept as it is
            f_new = f.clone()
            f_new[..., plan.clamp_idx] = plan.clamp_val
            h = self.sae.decode(f_new) + error
        if plan.add is not None:
            h = h + plan.add
        return h

    @contextmanager
    def edited(
        self, edits: Sequence[Edit], positions: Positions = "all", prompt_len: int | None = None
    ) -> Iterator[_EditHook | None]:
        """Within the block, the model runs with the edits applied (None: they change nothing, no hook).
        `prompt_len` bounds "prompt"; calls after the first continue the positions (KV-cache decoding)."""
        _check_positions(positions)
        plan = self._plan(edits)
        if plan is None:
            yield None
            return
        hook = _EditHook(self, plan, positions, prompt_len if prompt_len is not None else 1 << 62)
        handle = self.module.register_forward_hook(hook)
        try:
            yield hook
        finally:
            handle.remove()

    @contextmanager
    def _session(self) -> Iterator[None]:
        """no_grad and eval mode for one call, the model's own mode restored afterwards."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def forward(self, input_ids: torch.Tensor, edits: Sequence[Edit] = (), positions: Positions = "all") -> Any:
        """The model's output for `input_ids` [B, T] with the edits (one forward, no continuation)."""
        ids = self._ids(input_ids)
        with self._session(), self.edited(edits, positions, ids.shape[1]):
            return self.model(input_ids=ids)

    def _ids(self, input_ids: Any) -> torch.Tensor:
        import torch

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim != 2:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)}, expected [batch, tokens]")
        return ids.to(self.device)

    def _run(self, ids: torch.Tensor, continuation: int) -> dict[str, Any]:
        """One pass over the prompt [1, T] (the edit hook, if any, already registered) and a greedy
        continuation with the KV cache: every position goes through the hook exactly once."""
        if not self.causal:
            return {"pooled": self.model(input_ids=ids).last_hidden_state[0].double().mean(0)}
        out = self.model(input_ids=ids, use_cache=True)  # always, so every prompt pass runs the same code
        result: dict[str, Any] = {"logits": out.logits[0, -1].double()}
        generated: list[int] = []
        past, logits = out.past_key_values, out.logits[:, -1]
        for step in range(continuation):
            nxt = logits.argmax(-1, keepdim=True)  # [1, 1] greedy: no sampling, so no randomness
            generated.append(int(nxt))
            if step + 1 < continuation:  # the last token's own forward would change nothing
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
        result["continuation"] = generated
        return result

    def _clean_pass(self, ids: torch.Tensor, continuation: int) -> tuple[dict[str, Any], bool]:
        """The clean pass for a prompt and whether it came from the cache (keyed by the token ids):
        changing α reruns only the edited pass. A greedy continuation extends the shorter ones, so the
        longest computed serves them all."""
        key = tuple(ids[0].tolist())
        hit = self._clean.get(key)
        if hit is not None and len(hit.get("continuation", ())) >= continuation:
            self._clean.move_to_end(key)
            return ({**hit, "continuation": hit["continuation"][:continuation]} if self.causal else hit), True
        captured: list[torch.Tensor] = []

        def capture(_m: nn.Module, _i: Any, out: Any) -> None:  # returns None: reads, does not edit
            if not captured:  # the prompt pass only, not the decoding steps
                captured.append((out[0] if isinstance(out, tuple) else out)[0].float())

        handle = self.module.register_forward_hook(capture)
        try:
            entry = self._run(ids, continuation)
        finally:
            handle.remove()
        entry["h"] = captured[0]  # [T, d_in] the hook point's clean output
        self._clean[key] = entry
        while len(self._clean) > CLEAN_CACHE:
            self._clean.popitem(last=False)
        return entry, False

    def features_at(self, input_ids: torch.Tensor, top: int = 8) -> list[list[tuple[int, float]]]:
        """Per token of the prompt [1, T], the SAE's `top` most active features (index, activation) on the
        clean pass; features at 0 are left out."""
        with self._session():
            acts = self.sae.encode(self._clean_pass(self._ids(input_ids)[:1], 0)[0]["h"])  # [T, d_sae]
            vals, idx = acts.topk(min(top, acts.shape[-1]), dim=-1)
        return [
            [(int(i), float(v)) for v, i in zip(vr, ir, strict=True) if v > 0] for vr, ir in zip(vals, idx, strict=True)
        ]

    def compare(
        self,
        input_ids: torch.Tensor,
        edits: Sequence[Edit],
        positions: Positions = "all",
        top_k: int = 10,
        continuation: int = 0,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Clean vs edited on one prompt [1, T]. See the module docstring for what α means."""
        import torch

        ids = self._ids(input_ids)
        if ids.shape[0] != 1:
            raise ValueError(f"compare takes one prompt, [1, T]; got {tuple(ids.shape)}")
        if not self.causal and continuation:
            raise ValueError("continuation needs a causal LM; this model is an encoder")
        _check_positions(positions)
        t = ids.shape[1]
        with self._session():
            clean, cached = self._clean_pass(ids, continuation)
            plan = self._plan(edits)
            if plan is None:  # nothing changes: the clean pass *is* the edited pass, bit for bit
                edited, seconds = clean, 0.0
                mask = _position_mask(positions, 0, t, t).to(self.device)
                feats = list(dict.fromkeys(e.feature for e in edits))
                acts = self.sae.encode(clean["h"][mask])[:, feats].cpu()
                where = mask.nonzero().squeeze(1).tolist() if edits else []
                shift = {"residual_shift": 0.0, "edited_positions": where, "features": _feature_rows(feats, acts, acts)}
            else:
                start = time.perf_counter()
                with self.edited(edits, positions, t) as hook:
                    edited = self._run(ids, continuation)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - start
                shift = hook.summary()
        result: dict[str, Any] = {
            "causal": self.causal,
            "edits": [{"feature": e.feature, "mode": e.mode, "alpha": e.alpha} for e in edits],
            "positions": positions if isinstance(positions, str) else list(positions),
            "prompt_tokens": t,
            "seconds": seconds,
            "clean_cached": cached,
            **shift,
        }
        if self.causal:
            lp, lq = torch.log_softmax(clean["logits"], -1), torch.log_softmax(edited["logits"], -1)  # float64
            result["kl"] = float((lp.exp() * (lp - lq)).sum())
            result["top_clean"] = _top(lp, top_k)
            result["top_edited"] = _top(lq, top_k)
            result["continuation_clean"] = clean["continuation"]
            result["continuation_edited"] = edited["continuation"]
            result["seed"] = seed  # greedy decoding draws nothing; recorded so a run states how it was made
        else:
            cos = torch.nn.functional.cosine_similarity(clean["pooled"], edited["pooled"], dim=0)
            result["embedding_cosine"] = float(cos)
        return result

    def off_target(
        self, windows: torch.Tensor, edits: Sequence[Edit], positions: Positions = "all", batch: int = 8
    ) -> dict[str, Any]:
        """What the edits do away from the prompt, on held-out windows [N, T]. Causal: mean KL(clean ‖
        edited) over every position, and perplexity edited − clean; encoders: mean cosine of the pooled
        embeddings."""
        import torch

        ids = self._ids(windows)
        n, t = ids.shape
        if self.causal and t < 2:
            raise ValueError(f"windows of {t} token: perplexity needs at least 2 tokens per window")
        kl_sum, ce_clean, ce_edit, cos_sum = 0.0, 0.0, 0.0, 0.0
        with self._session():
            plan = self._plan(edits)
            for lo in range(0, n, batch):
                x = ids[lo : lo + batch]
                clean = self.model(input_ids=x)
                if plan is None:
                    edit = clean  # nothing changes: reuse, bit for bit
                else:
                    with self.edited(edits, positions, t):
                        edit = self.model(input_ids=x)
                if self.causal:
                    lp = torch.log_softmax(clean.logits.double(), -1)  # [b, T, V]
                    lq = torch.log_softmax(edit.logits.double(), -1)
                    kl_sum += float((lp.exp() * (lp - lq)).sum())
                    target = x[:, 1:].unsqueeze(-1)  # position t predicts token t+1
                    ce_clean -= float(lp[:, :-1].gather(-1, target).sum())
                    ce_edit -= float(lq[:, :-1].gather(-1, target).sum())
                else:
                    a = clean.last_hidden_state.double().mean(1)
                    b = edit.last_hidden_state.double().mean(1)
                    cos_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
        if not self.causal:
            return {"windows": n, "embedding_cosine": cos_sum / n}
        ppl_clean, ppl_edit = float(np.exp(ce_clean / (n * (t - 1)))), float(np.exp(ce_edit / (n * (t - 1))))
        out = {"windows": n, "tokens": n * t, "kl_mean": kl_sum / (n * t), "ppl_clean": ppl_clean}
        return out | {"ppl_edited": ppl_edit, "delta_ppl": ppl_edit - ppl_clean}


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    vals, idx = logp.topk(min(k, logp.shape[-1]))
    return [(int(i), float(v.exp())) for v, i in zip(vals, idx, strict=True)]


def _check_positions(positions: Positions) -> None:
    if positions in ("all", "prompt"):
        return
    ok = isinstance(positions, tuple) and len(positions) == 2 and all(isinstance(p, int) for p in positions)
    if not ok or not 0 <= positions[0] < positions[1]:
        raise ValueError(f"positions {positions!r}: expected 'all', 'prompt' or a range (start, end), 0 ≤ start < end")
