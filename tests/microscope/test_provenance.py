"""Feature provenance checked against independent references: a closed form where the path between the
layers is linear, and finite differences (the test's own splice hook) on a tiny GPT-2."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from microscope import audits
from microscope import provenance as prov_mod
from microscope.errors import InputError
from microscope.provenance import graph_dot, pick_upstream, provenance, upstream_features
from microscope.sae.io import LoadedSAE
from microscope.store import LocalStore
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus

D, D_SAE, UP, TARGET = 32, 64, "transformer.h.1", "transformer.h.3"


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=D, n_head=2, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval().double()


def sae(seed: int, dtype: torch.dtype = torch.float64) -> LoadedSAE:
    """Tied ReLU SAE with unit-norm decoder rows and a small random encoder bias."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, D, generator=g, dtype=dtype)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    b_enc = 0.1 * torch.randn(D_SAE, generator=g, dtype=dtype)
    weights = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec, "b_enc": b_enc, "b_dec": torch.zeros(D, dtype=dtype)}
    return LoadedSAE({"architecture": "relu", "d_in": D, "d_sae": D_SAE}, weights)


def ids(n: int = 3, t: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(3).integers(0, 100, (n, t)))


def hidden(model: torch.nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = dict(model.named_modules())[path].register_forward_hook(
        lambda _m, _i, o: got.append((o[0] if isinstance(o, tuple) else o).detach())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got[0]


def active_feature_positions(model, path, x, target_sae) -> tuple[int, list[tuple[int, int]]]:
    """The target feature active at the most tokens, and (row, position) pairs where it is clearly on."""
    f = target_sae.encode(hidden(model, path, x))  # [n, T, d_sae]
    i = int((f > 0).sum((0, 1)).argmax())
    on = (f[..., i] > 0.05).nonzero().tolist()
    picked: dict[int, list[int]] = {}
    for r, p in on:  # up to two per window, so several windows are read
        if len(picked.setdefault(r, [])) < 2:
            picked[r].append(p)
    return i, [(r, p) for r, ps in picked.items() for p in ps]


class Res(torch.nn.Module):
    def __init__(self, linear: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.linear = linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:  # a tuple, like transformer blocks
        y = x @ self.w
        return (x + (y if self.linear else torch.tanh(y)),)


class TinyResidual(torch.nn.Module):
    """Blocks 0-1 nonlinear, 2-3 linear (per token): block 3's output is block 1's times a matrix M."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb = torch.nn.Embedding(100, D, dtype=torch.float64)
        self.blocks = torch.nn.ModuleList([Res(i >= 2, 10 + i) for i in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)[0]
        return h

    def path_matrix(self) -> torch.Tensor:
        eye = torch.eye(D, dtype=torch.float64)
        return (eye + self.blocks[2].w.detach()) @ (eye + self.blocks[3].w.detach())


def test_linear_path_matches_closed_form():
    model, up, tgt, x = TinyResidual(), sae(1), sae(2), ids()
    h1, h3 = hidden(model, "blocks.1", x), hidden(model, "blocks.3", x)
    pre = (h3 - tgt.b_dec) @ tgt.W_enc + tgt.b_enc  # [n, T, d_sae]
    i = int((pre > 0).sum((0, 1)).argmax())
    positions = [(0, 3), (0, 9), (1, 0), (1, 15), (2, 7), (2, 8)]
    got = upstream_features(model, tgt, "blocks.3", i, up, "blocks.1", x, positions, top=D_SAE)

    a = up.encode(h1)  # [n, T, d_up]
    gain = up.W_dec @ model.path_matrix() @ tgt.W_enc[:, i]  # [d_up]: ∂pre_i/∂a_j along the linear path
    want = torch.zeros(D_SAE, dtype=torch.float64)
    for r, p in positions:
        if pre[r, p, i] > 0:  # a ReLU feature passes its gradient only where it is on
            want += a[r, p] * gain
    assert (pre[[r for r, _ in positions], [p for _, p in positions], i] > 0).any()
    scores = torch.zeros(D_SAE, dtype=torch.float64)
    for e in got:
        scores[e["feature"]] = e["score"]
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
    total = sum(abs(e["score"]) for e in got)
    assert sum(e["share"] for e in got) == pytest.approx(1.0)
    assert all(e["share"] == pytest.approx(abs(e["score"]) / total) for e in got)
    assert [abs(e["score"]) for e in got] == sorted((abs(e["score"]) for e in got), reverse=True)


def spliced_objective(model, up, tgt, i, x, positions, j: int | None, eps: float) -> float:
    """Σ f_i at the positions with a_j scaled by (1+eps) at each row's tokens up to its last position."""
    last = {}
    for r, p in positions:
        last[r] = max(last.get(r, -1), p)

    def splice(_m, _i, out):  # blocks return the hidden state alone or first in a tuple
        h = out[0] if isinstance(out, tuple) else out
        a = up.encode(h)
        err = h - up.decode(a)
        if j is not None:
            a = a.clone()
            for r, p in last.items():
                a[r, : p + 1, j] *= 1 + eps
        new = up.decode(a) + err
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = dict(model.named_modules())[UP].register_forward_hook(splice)
    try:
        h3 = hidden(model, TARGET, x)
    finally:
        handle.remove()
    f = tgt.encode(h3)[..., i]
    return float(sum(f[r, p] for r, p in positions))


def test_gpt2_scores_match_finite_differences(monkeypatch):
    monkeypatch.setattr(prov_mod, "BATCH_WINDOWS", 2)  # 3 windows: two passes, their scores summed
    model, up, tgt, x = gpt2(), sae(1), sae(2), ids()
    i, positions = active_feature_positions(model, TARGET, x, tgt)
    assert len({r for r, _ in positions}) == 3
    got = upstream_features(model, tgt, TARGET, i, up, UP, x, positions, top=5)
    assert len(got) == 5
    eps = 1e-3
    for e in got:
        plus = spliced_objective(model, up, tgt, i, x, positions, e["feature"], eps)
        minus = spliced_objective(model, up, tgt, i, x, positions, e["feature"], -eps)
        fd = (plus - minus) / (2 * eps)
        assert e["score"] == pytest.approx(fd, rel=1e-2), (e, fd)
        assert e["mean_activation"] >= 0


def test_model_untouched_and_no_hook_left():
    model, up, tgt, x = gpt2(), sae(1), sae(2), ids()
    i, positions = active_feature_positions(model, TARGET, x, tgt)
    with torch.no_grad():
        before_out = model(x).logits.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    up_before = up.W_enc.clone()
    model.train()  # the call runs in eval mode and restores this
    upstream_features(model, tgt, TARGET, i, up, UP, x, positions)
    assert model.training
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    with torch.no_grad():
        assert torch.equal(model(x).logits, before_out)
    assert torch.equal(up.W_enc, up_before) and up.W_enc.dtype == torch.float64


def test_graph_dot_escapes():
    prov = {
        "target": {"hook": "blocks.3.hook_resid_post", "feature": 7, "top_context": 'say "hi" \\ there'},
        "upstream_hook": "blocks.1.hook_resid_post",
        "edges": [
            {"feature": 3, "score": 0.5, "share": 0.75, "mean_activation": 1.0, "top_context": 'a "quoted"\nword'},
            {"feature": 11, "score": -0.2, "share": 0.25, "mean_activation": 0.3, "top_context": ""},
        ],
        "contexts_used": 4,
    }
    dot = graph_dot(prov)
    assert dot.startswith("digraph provenance {") and dot.rstrip().endswith("}")
    assert "target [" in dot and "u3 [" in dot and "u11 [" in dot
    assert "u3 -> target" in dot and "u11 -> target" in dot
    assert '\\"hi\\"' in dot and '\\"quoted\\"' in dot and "\\\\ there" in dot
    for line in dot.splitlines():  # unescaped quotes pair up on every line
        assert line.replace("\\\\", "").replace('\\"', "").count('"') % 2 == 0, line


def record(store: LocalStore, hooks: list[str]) -> AuditRecord:
    ok = StageStatus.completed
    rec = AuditRecord(
        audit_id="a1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        status=ok,
        model=ModelRef(source="m", source_fingerprint="f"),
        config={},
        store_uri=store.uri,
        saes={h: StageRecord(stage="sae", status=ok, details={"prefix": f"x/{h}"}) for h in hooks},
    )
    audits.save(store, rec)
    return rec


def test_provenance_refuses_without_upstream_sae(tmp_path):
    store = LocalStore(tmp_path)
    record(store, ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"])
    with pytest.raises(InputError) as err:
        provenance(store, "a1", "blocks.3.hook_resid_post", 0)
    msg = str(err.value)
    assert "\n" not in msg and "no SAE upstream" in msg and "sae.hooks" in msg


def test_pick_upstream_prefers_two_back(tmp_path):
    store = LocalStore(tmp_path)
    rec = record(store, [f"blocks.{i}.hook_resid_post" for i in (0, 1, 2, 3)])
    assert pick_upstream(rec, "blocks.3.hook_resid_post") == "blocks.1.hook_resid_post"
    rec = record(store, [f"blocks.{i}.hook_resid_post" for i in (0, 2, 3)])
    assert pick_upstream(rec, "blocks.3.hook_resid_post") == "blocks.2.hook_resid_post"
