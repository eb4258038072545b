"""Hooks against output_hidden_states, Parquet round trips, resume after a kill, OOM back-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microscope.errors import InputError
from microscope.models.loading import describe
from microscope.store import LocalStore
from microscope.trace import (
    _PartWriter,
    activation_matrix,
    hook_name,
    read_activations,
    resolve_layers,
    resolve_points,
    trace_to_parquet,
)
from schemas.config import TraceConfig
from tests.conftest import build_model

FINAL_NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm"}
ATOL = 1e-5


def run_trace(model, ids, tmp_path, layers="all", hooks=("resid", "mlp", "attn"), progress=None, **cfg):
    arch = describe(model)
    store = LocalStore(tmp_path / "store")
    pts = resolve_points(arch.hook_points, resolve_layers(layers, arch.n_layers), list(hooks), arch.family)
    blocks = {p.layer: p.resid for p in arch.hook_points}
    tc = TraceConfig(**{"batch_size": 4, "part_tokens": 64, "row_group_tokens": 48, **cfg})
    res = trace_to_parquet(model, ids, np.zeros_like(ids), pts, blocks, tc, store, "p", progress)
    return store, res


def acts(store, res, layer, hook) -> np.ndarray:
    return activation_matrix(read_activations(store, res.datasets[hook_name(layer, hook)]["parts"]))


def token_ids(n=10, s=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, (n, s)).astype(np.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "gpt_neox"])
def test_resid_equals_output_hidden_states(family: str, tmp_path: Path) -> None:
    model = build_model(family)
    ids = token_ids()
    store, res = run_trace(model, ids, tmp_path)
    with torch.no_grad():
        hs = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states
    n = len(hs) - 1
    modules = dict(model.named_modules())
    for layer in range(n):
        got = acts(store, res, layer, "resid")
        ref = hs[layer + 1]
        if layer == n - 1 and family in FINAL_NORM:
            # HF applies the final norm to the last hidden state; the block's own output is before it.
            with torch.no_grad():
                got_t = modules[FINAL_NORM[family]](torch.from_numpy(got.copy()))
            got = got_t.numpy()
        np.testing.assert_allclose(got, ref.reshape(-1, ref.shape[-1]).numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_pre_ln_residual_decomposes(family: str, tmp_path: Path) -> None:
    """In pre-LN blocks the stream adds exactly the attention and MLP outputs: resid_L = resid_{L-1} + attn_L + mlp_L."""
    model = build_model(family)
    store, res = run_trace(model, token_ids(), tmp_path)
    for layer in (1, 2):
        lhs = acts(store, res, layer, "resid")
        rhs = acts(store, res, layer - 1, "resid") + acts(store, res, layer, "attn") + acts(store, res, layer, "mlp")
        np.testing.assert_allclose(lhs, rhs, atol=ATOL, rtol=0)


def test_rows_trace_back_to_tokens(tmp_path: Path) -> None:
    ids = token_ids(7, 16)
    store, res = run_trace(build_model("gpt2"), ids, tmp_path, layers=[1], hooks=["resid"])
    t = read_activations(store, res.datasets[hook_name(1, "resid")]["parts"])
    assert t.num_rows == ids.size
    w, p, tok = (np.asarray(t.column(c)) for c in ("window", "position", "token_id"))
    np.testing.assert_array_equal(ids[w, p], tok)
    assert len(res.datasets[hook_name(1, "resid")]["parts"]) == 2  # 64-token parts of 16-token windows: 4+3


def test_parquet_round_trip_is_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    x[0, :4] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    store = LocalStore(tmp_path)
    w = _PartWriter(store, "a/part-00000.parquet", 24, TraceConfig(row_group_tokens=64))
    for lo in range(0, 300, 50):
        sl = slice(lo, lo + 50)
        z = np.zeros(50, np.int32)
        w.write(z, z, z, z, x[sl])
    w.close()
    got = activation_matrix(read_activations(store, ["a/part-00000.parquet"]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), x.view(np.uint32))
    import pyarrow.parquet as pq

    assert (
        pq.ParquetFile(store.local_path("a/part-00000.parquet")).metadata.num_row_groups == 3
    )  # 50-row writes buffered to ≥64 rows


def test_stats_match_numpy(tmp_path: Path) -> None:
    store, res = run_trace(build_model("llama"), token_ids(), tmp_path, layers=[0], hooks=["mlp"], near_zero=1e-3)
    x = acts(store, res, 0, "mlp").astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    s = res.datasets[hook_name(0, "mlp")]["stats"]
    assert s["mean_norm"] == pytest.approx(norms.mean(), rel=1e-6)
    assert s["std_norm"] == pytest.approx(norms.std(), rel=1e-4)
    assert s["max_norm"] == pytest.approx(norms.max(), rel=1e-6)
    assert s["near_zero_frac"] == pytest.approx(np.mean(np.abs(x) < 1e-3), abs=1e-12)


def test_forward_stops_after_last_traced_block(tmp_path: Path) -> None:
    model = build_model("gpt2")
    calls = []
    model.transformer.h[2].register_forward_hook(lambda *a: calls.append(2))
    model.transformer.ln_f.register_forward_hook(lambda *a: calls.append("ln_f"))
    run_trace(model, token_ids(), tmp_path, layers=[0, 1], hooks=["resid"])
    assert calls == []


class Killed(Exception):
    pass


def test_resume_after_kill_skips_complete_parts(tmp_path: Path) -> None:
    model = build_model("bert")
    ids = token_ids(12, 16)  # 3 parts of 4 windows

    def die_in_part_two(done: int, total: int) -> None:
        if done > 4:
            raise Killed

    with pytest.raises(Killed):
        run_trace(model, ids, tmp_path / "a", progress=die_in_part_two)
    store_a = LocalStore(tmp_path / "a" / "store")
    # Only whole parts exist: part 0 of every dataset, and no temp files are listed.
    assert all(k.endswith("part-00000.parquet") for k in store_a.list("p"))
    seen = []
    store_a, resumed = run_trace(model, ids, tmp_path / "a", progress=lambda d, t: seen.append(d))
    assert resumed.resumed_from_window == 4 and seen[0] > 4
    store_b, whole = run_trace(model, ids, tmp_path / "b")
    for name, ds in whole.datasets.items():
        assert resumed.datasets[name]["stats"] == pytest.approx(ds["stats"])
        a = activation_matrix(read_activations(store_a, resumed.datasets[name]["parts"]))
        b = activation_matrix(read_activations(store_b, ds["parts"]))
        np.testing.assert_array_equal(a, b)


class OOMAbove(torch.nn.Module):
    """Wraps a model; raises out-of-memory for batches larger than `limit`, as a GPU would."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.limit = limit

    def forward(self, input_ids: torch.Tensor, **kw):
        if input_ids.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, **kw)


def test_oom_halves_batch_and_continues(tmp_path: Path) -> None:
    model = build_model("gpt2")
    ids = token_ids(10, 16)
    wrapped = OOMAbove(model, limit=2)
    store, res = run_trace(wrapped, ids, tmp_path / "a", hooks=["resid"], batch_size=16)
    assert res.final_batch_size == 2 and res.oom_halvings == 3
    ref_store, ref = run_trace(model, ids, tmp_path / "b", hooks=["resid"])
    for layer in range(3):
        np.testing.assert_array_equal(acts(store, res, layer, "resid"), acts(ref_store, ref, layer, "resid"))
    with pytest.raises(InputError, match="out of memory at trace batch size 1"):
        run_trace(OOMAbove(model, limit=0), ids, tmp_path / "c", hooks=["resid"])


def test_layer_and_hook_errors() -> None:
    assert resolve_layers([0, -1], 6) == [0, 5]
    with pytest.raises(InputError, match=r"layer 6 does not exist; the model has 6 layers \(0..5\)"):
        resolve_layers([6], 6)
    with pytest.raises(InputError, match="names a layer twice"):
        resolve_layers([5, -1], 6)
