"""The provenance of a feature: which features of an SAE at an earlier layer feed it most.

The upstream SAE is spliced into its module's output as h = decode(a) + err (the error term detached,
so the model's output is unchanged and a is the only path that carries a gradient); the target feature's
activations at chosen tokens are summed and differentiated with respect to a. A feature's score is
attribution = activation × gradient, summed over the tokens each chosen position can see:
score_j = Σ_tokens a_j · ∂(Σ f_i)/∂a_j (exact when the path between the layers is linear, first order
otherwise). Only `a` receives a gradient: the model's parameters accumulate nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from microscope.errors import InputError

if TYPE_CHECKING:
    import torch
    from schemas.records import AuditRecord
    from torch import nn

    from microscope.sae.io import LoadedSAE
    from microscope.store import ArtifactStore

BATCH_WINDOWS = 8  # windows per forward/backward pass: bounds the graph kept for the backward
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|h|layers?|layer)\.(\d+)(?:\.|$)")


class _Reached(Exception):
    """Raised by the target's hook: nothing after the target module is needed."""


def _cast(sae: LoadedSAE, device: Any, dtype: Any) -> LoadedSAE:
    """A copy of the SAE on `device` in `dtype`: the caller's SAE is left where and as it is."""
    from microscope.sae.io import LoadedSAE

    return LoadedSAE(sae.cfg, {k: v.to(device, dtype) for k, v in sae.named_buffers()})


def upstream_features(
    model: nn.Module,
    target_sae: LoadedSAE,
    target_module: str,
    feature: int,
    upstream_sae: LoadedSAE,
    upstream_module: str,
    windows: torch.Tensor,
    positions: list[tuple[int, int]],
    top: int = 10,
) -> list[dict[str, Any]]:
    """The upstream features with the largest |score| for `feature` of `target_sae` (read at the output
    of `target_module`), best first: `feature`, `score`, `share` (of Σ|score| over all upstream features)
    and `mean_activation` (a_j's mean over the scored tokens). `windows` [n, T] are token ids, `positions`
    (row of `windows`, token position) the tokens where f_i is read; each row's scored tokens are those up
    to its last position (all that position sees in a causal model). The model is run in eval mode, its
    hooks are removed and its mode restored afterwards, and its parameters get no gradient."""
    import torch

    modules = dict(model.named_modules())
    for path in (target_module, upstream_module):
        if path not in modules:
            raise InputError(f"the model has no module {path!r}")
    param = next(model.parameters())
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # SAE math never in half precision
    up, tgt = _cast(upstream_sae, param.device, dtype), _cast(target_sae, param.device, dtype)
    d_up, d_tgt = up.W_dec.shape[0], tgt.W_dec.shape[0]
    if not 0 <= feature < d_tgt:
        raise InputError(f"feature {feature} is outside the target SAE (features 0 to {d_tgt - 1})")
    n, t_len = windows.shape
    chosen = sorted({(int(r), int(p)) for r, p in positions})
    if not chosen:
        raise InputError("no positions to read the feature at")
    bad = [(r, p) for r, p in chosen if not (0 <= r < n and 0 <= p < t_len)]
    if bad:
        raise InputError(f"positions {bad[:3]} are outside the windows (shape {n} x {t_len})")

    score = torch.zeros(d_up, dtype=dtype, device=param.device)  # Σ a_j ∂F/∂a_j over scored tokens
    act_sum = torch.zeros(d_up, dtype=dtype, device=param.device)
    n_tokens = 0
    rows = sorted({r for r, _ in chosen})
    was_training = model.training
    model.eval()
    handles = []
    try:
        for start in range(0, len(rows), BATCH_WINDOWS):
            batch_rows = rows[start : start + BATCH_WINDOWS]
            local = {r: k for k, r in enumerate(batch_rows)}
            b_idx = torch.tensor([local[r] for r, _ in chosen if r in local], device=param.device)
            t_idx = torch.tensor([p for r, p in chosen if r in local], device=param.device)
            state: dict[str, torch.Tensor] = {}

            def splice(_m: Any, _i: Any, out: Any, state: dict[str, torch.Tensor] = state) -> Any:
                h = out[0] if isinstance(out, tuple) else out  # [b, T, d]: blocks may return (hidden, ...)
                hc = h.to(dtype)
                with torch.no_grad():
                    a = up.encode(hc)  # [b, T, d_up]
                    err = hc - up.decode(a)  # what the SAE does not explain, a constant here
                a.requires_grad_(True)
                state["a"] = a
                new = (up.decode(a) + err).to(h.dtype)
                return (new, *out[1:]) if isinstance(out, tuple) else new

            def read(_m: Any, _i: Any, out: Any, state: dict[str, torch.Tensor] = state) -> Any:
                state["h"] = out[0] if isinstance(out, tuple) else out
                raise _Reached

            handles = [modules[upstream_module].register_forward_hook(splice)]
            handles.append(modules[target_module].register_forward_hook(read))
            ids = windows[batch_rows].to(param.device)  # [b, T]
            with torch.enable_grad():
                try:
                    model(ids)
                except _Reached:
                    pass
                for h in handles:
                    h.remove()
                handles = []
                if "h" not in state:
                    raise InputError(f"the model never reached {target_module!r}")
                if "a" not in state:
                    raise InputError(f"{upstream_module!r} does not run before {target_module!r}")
                a = state["a"]
                f = tgt.encode(state["h"].to(dtype))[..., feature]  # [b, T]
                total = f[b_idx, t_idx].sum()
                grad = None
                if total.requires_grad:
                    (grad,) = torch.autograd.grad(total, a, allow_unused=True)
                grad = torch.zeros_like(a) if grad is None else grad
            last = torch.full((len(batch_rows),), -1, device=param.device)
            last = last.scatter_reduce(0, b_idx, t_idx, reduce="amax")
            mask = (torch.arange(a.shape[1], device=param.device)[None, :] <= last[:, None]).to(dtype)  # [b, T]
            a = a.detach()
            score += (a * grad * mask[..., None]).sum((0, 1))
            act_sum += (a * mask[..., None]).sum((0, 1))
            n_tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    total_abs = float(score.abs().sum())
    order = score.abs().argsort(descending=True)[:top].tolist()
    return [
        {
            "feature": int(j),
            "score": float(score[j]),
            "share": abs(float(score[j])) / total_abs if total_abs > 0 else 0.0,
            "mean_activation": float(act_sum[j]) / max(n_tokens, 1),
        }
        for j in order
        if float(score[j]) != 0.0
    ]


def block_index(hook: str) -> int | None:
    """The block a hook reads (`blocks.3.hook_resid_post`, `transformer.h.3`, `encoder.layer.3`: 3)."""
    m = _BLOCK.search(hook)
    return int(m.group(1)) if m else None


def pick_upstream(record: AuditRecord, hook: str) -> str:
    """The audit's SAE two blocks before `hook`'s, else the one closest below it."""
    from schemas.records import StageStatus

    trained = [h for h, r in record.saes.items() if r.status not in (StageStatus.failed, StageStatus.skipped)]
    target = block_index(hook)
    if target is None:
        raise InputError(f"cannot tell which block {hook!r} is in; pass upstream_hook")
    below = sorted((i, h) for h in trained if h != hook and (i := block_index(h)) is not None and i < target)
    if not below:
        raise InputError(
            f"audit {record.audit_id} has no SAE upstream of {hook} (trained: {', '.join(trained) or 'none'}); "
            f"train an SAE on an earlier hook: list e.g. blocks.{max(target - 2, 0)}.hook_resid_post in sae.hooks"
        )
    two_back = [h for i, h in below if i == target - 2]
    return sorted(two_back, key=lambda h: ("resid_post" not in h, h))[0] if two_back else below[-1][1]


def snippet(context: dict[str, Any] | None, width: int = 24) -> str:
    """A context as `…left[token]right…`, each side cut to `width` characters."""
    if not context:
        return ""
    left, token, right = (str(context.get(k) or "") for k in ("left", "token", "right"))
    return f"{left[-width:]}[{token}]{right[:width]}".replace("\n", " ")


def provenance(
    store: ArtifactStore, audit_id: str, hook: str, feature: int, top: int = 10, upstream_hook: str | None = None
) -> dict[str, Any]:
    """The upstream features that feed `feature` of the audit's SAE on `hook`, read at the feature's top
    contexts: {target: {hook, feature}, upstream_hook, edges: [{feature, score, share, mean_activation,
    top_context}], contexts_used}."""
    import torch

    from microscope import audits
    from microscope.modality import open_data
    from microscope.models import loading
    from microscope.results.sae import feature_contexts
    from microscope.sae.io import load
    from microscope.steering_audit import module_of, sae_folder

    record = audits.load(store, audit_id)
    up_hook = upstream_hook or pick_upstream(record, hook)
    contexts = feature_contexts(store, record, hook, feature)
    if not contexts:
        raise InputError(f"feature {feature} of the SAE on {hook} has no stored top contexts to read it at")
    data = open_data(record.stages["ingest"], store)
    if data.kind != "text":
        raise InputError(f"provenance reads token windows; audit {audit_id}'s data are {data.kind}")
    saes = {h: load(sae_folder(store, record, h)) for h in (hook, up_hook)}
    mods = {h: module_of(record, record.saes[h].details.get("hook", h)) for h in (hook, up_hook)}
    win = sorted({int(c["window"]) for c in contexts})
    row = {w: k for k, w in enumerate(win)}
    positions = [(row[int(c["window"])], int(c["position"])) for c in contexts]
    windows = torch.from_numpy(data.ids[win].astype("int64"))  # [n, T]
    model = loading.load_model(record.model, loading.compute_device())
    edges = upstream_features(
        model, saes[hook], mods[hook], feature, saes[up_hook], mods[up_hook], windows, positions, top
    )
    for e in edges:
        top_ctx = feature_contexts(store, record, up_hook, e["feature"])
        e["top_context"] = snippet(top_ctx[0]) if top_ctx else ""
    return {
        "target": {"hook": hook, "feature": feature, "top_context": snippet(contexts[0])},
        "upstream_hook": up_hook,
        "edges": edges,
        "contexts_used": len(positions),
    }


def _q(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as DOT's \\n."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{text}"'


def graph_dot(prov: dict[str, Any]) -> str:
    """Graphviz DOT text: the target feature and its upstream features, edges as wide as their share,
    green where the feature raises the target, red where it lowers it (`st.graphviz_chart` shows it)."""
    t = prov["target"]
    lines = [
        "digraph provenance {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#f3f4f6", fontsize=10];',
    ]
    target = f"{t['hook']}\n#{t['feature']}\n{t.get('top_context', '')}"
    lines.append(f'  target [label={_q(target)}, fillcolor="#fde68a"];')
    for e in prov["edges"]:
        node = f"u{int(e['feature'])}"
        label = f"{prov['upstream_hook']}\n#{e['feature']}\n{e.get('top_context', '')}"
        lines.append(f"  {node} [label={_q(label)}];")
        width = 0.5 + 8.0 * float(e["share"])
        color = "#16a34a" if e["score"] >= 0 else "#dc2626"
        edge_label = f"{100 * e['share']:.0f}% ({e['score']:+.3g})"
        lines.append(f'  {node} -> target [penwidth={width:.2f}, color="{color}", label={_q(edge_label)}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
