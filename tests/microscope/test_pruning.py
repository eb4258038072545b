"""Pruning: exact counts, the kept sets match independent references (numpy argsort, torch.func
gradients, hand-computed activation norms), GPT-2's Conv1D orientation, folded masks, format names."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from microscope import pruning as pr
from tests.conftest import build_model


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # 35 + 21 weights


def kept_by_argsort(scores: np.ndarray, k: int) -> np.ndarray:
    """Reference keep-mask: all but the k lowest (stable argsort: ties go to the lowest index)."""
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, kind="stable")[:k]] = False
    return keep


def flat(masks: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([m.numpy().ravel() for m in masks.values()])


# --- selection


def test_prunable_selects_linears_and_conv1d_but_not_embeddings_or_the_head() -> None:
    model = build_model("gpt2")
    names = set(pr.prunable(model))
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.mlp.c_proj" in names
    assert pr.default_exclude(model) == {"lm_head"}
    assert not any("wte" in n or "wpe" in n or "lm_head" in n or "ln" in n for n in names)
    # lm_head is tied to wte: even when not excluded by name it is never pruned.
    assert "lm_head" not in pr.prunable(model, exclude=set())


def test_gpt2_magnitude_keeps_embeddings_and_tying() -> None:
    model = build_model("gpt2")
    wte = model.transformer.wte.weight.detach().clone()
    report = pr.prune(model, pr.parse_format("magnitude-50"))
    assert torch.equal(model.transformer.wte.weight, wte)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert report["overall"] == pytest.approx(0.5, abs=1e-6) and "lm_head" not in report
    model(input_ids=torch.arange(8)[None])  # still runs


# --- magnitude


def test_global_magnitude_exact_count_and_topk_set() -> None:
    model = mlp()
    masks = pr.magnitude_masks(model, 0.5, "global")
    weights = np.concatenate([model[0].weight.detach().numpy().ravel(), model[2].weight.detach().numpy().ravel()])
    n = weights.size
    assert (~flat(masks)).sum() == n // 2
    np.testing.assert_array_equal(flat(masks), kept_by_argsort(np.abs(weights), n // 2))


def test_global_magnitude_ties_broken_by_index() -> None:
    model = mlp()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.fill_(1.0)
    masks = pr.magnitude_masks(model, 0.5, "global")
    assert (~masks["0"]).sum() == 28 and masks["2"].all()  # the first 28 of 56, all in layer 0
    assert not masks["0"].flatten()[:28].any()


def test_layer_magnitude_counts_per_matrix() -> None:
    model = mlp()
    masks = pr.magnitude_masks(model, 0.5, "layer")
    for name, mod in (("0", model[0]), ("2", model[2])):
        w = mod.weight.detach().numpy()
        assert (~masks[name]).sum() == w.size // 2
        np.testing.assert_array_equal(masks[name].numpy().ravel(), kept_by_argsort(np.abs(w).ravel(), w.size // 2))


def test_apply_masks_folds_and_keeps_state_dict_keys() -> None:
    model = mlp()
    keys = list(model.state_dict())
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    before = {n: m.weight.detach().clone() for n, m in pr.prunable(model).items()}
    masks = pr.magnitude_masks(model, 0.5, "global")
    report = pr.apply_masks(model, masks)
    assert list(model.state_dict()) == keys
    assert not any("orig" in k or "mask" in k for k in model.state_dict())
    assert not model[0]._forward_pre_hooks and isinstance(model[0].weight, nn.Parameter)
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[2].bias, biases[1])
    for name, mod in pr.prunable(model).items():
        torch.testing.assert_close(mod.weight.detach(), before[name] * masks[name])
        assert report[name] == pytest.approx((~masks[name]).sum().item() / masks[name].numel())
    assert report["overall"] == 28 / 56 and report["note"] == "no fine-tuning after pruning"
    assert all(type(v) is float for k, v in report.items() if k != "note")


# --- SNIP


def test_snip_scores_equal_mask_gradients() -> None:
    model = mlp()
    torch.manual_seed(1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    scores = pr.snip_scores(model, loss_fn)
    # Reference: an explicit mask parameter at 1, W ⊙ m, differentiated with torch.func.
    params = {k: v.detach() for k, v in model.named_parameters()}
    masks = {n: torch.ones_like(params[f"{n}.weight"]) for n in ("0", "2")}

    def masked_loss(ms: dict[str, torch.Tensor]) -> torch.Tensor:
        p = dict(params) | {f"{n}.weight": params[f"{n}.weight"] * m for n, m in ms.items()}
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    ref = torch.func.grad(masked_loss)(masks)
    for n in ("0", "2"):
        torch.testing.assert_close(scores[n], ref[n].abs(), atol=1e-6, rtol=0)
    kept = pr.snip_masks(model, loss_fn, 0.3)
    np.testing.assert_array_equal(flat(kept), kept_by_argsort(flat({n: ref[n].abs() for n in ref}), int(0.3 * 56)))
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no .grad behind


# --- Wanda


def batches() -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randn(2, 4, 5), torch.randn(3, 4, 5)]  # [batch, tokens, features]


def test_wanda_norms_scores_and_row_counts_match_numpy() -> None:
    model = mlp()
    norms = pr.input_norms_from_activations(model, batches())
    x = np.concatenate([b.numpy().reshape(-1, 5) for b in batches()]).astype(np.float64)
    w0, b0 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    h = np.maximum(x @ w0.T + b0, 0)  # layer 2's input
    ref_norms = {"0": np.sqrt((x**2).sum(0)), "2": np.sqrt((h**2).sum(0))}
    scores = pr.wanda_scores(model, norms)
    masks = pr.wanda_masks(model, norms, 0.5)
    for name, mod in (("0", model[0]), ("2", model[2])):
        np.testing.assert_allclose(norms[name].numpy(), ref_norms[name], rtol=1e-5)
        ref = np.abs(mod.weight.detach().numpy()) * ref_norms[name][None, :]
        np.testing.assert_allclose(scores[name].numpy(), ref, rtol=1e-5)
        k = ref.shape[1] // 2
        assert ((~masks[name]).sum(1) == k).all()
        for row in range(ref.shape[0]):
            np.testing.assert_array_equal(masks[name][row].numpy(), kept_by_argsort(scores[name][row].numpy(), k))


def test_wanda_conv1d_orientation_matches_linear() -> None:
    torch.manual_seed(3)
    conv = nn.Sequential(Conv1D(6, 8))  # GPT-2 style: weight [in=8, out=6]
    lin = nn.Sequential(nn.Linear(8, 6))
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.t())
        lin[0].bias.copy_(conv[0].bias)
    data = [torch.randn(2, 5, 8)]
    torch.testing.assert_close(conv(data[0]), lin(data[0]))
    norms_c, norms_l = pr.input_norms_from_activations(conv, data), pr.input_norms_from_activations(lin, data)
    torch.testing.assert_close(norms_c["0"], norms_l["0"])
    for sparsity, k in ((0.5, 4), (0.3, 2)):
        mc, ml = pr.wanda_masks(conv, norms_c, sparsity), pr.wanda_masks(lin, norms_l, sparsity)
        assert mc["0"].shape == (8, 6) and torch.equal(mc["0"].t(), ml["0"])
        assert ((~mc["0"]).sum(0) == k).all()  # per output neuron = per column of Conv1D's weight


def test_wanda_conv2d_norms_are_patch_norms() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 2, 4, 5)
    norms = pr.input_norms_from_activations(model, [x])
    xp = np.pad(x.numpy().astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = [xp[b, :, i : i + 3, j : j + 3].ravel() for b in range(2) for i in range(4) for j in range(5)]
    np.testing.assert_allclose(norms["0"].numpy(), np.sqrt((np.array(patches) ** 2).sum(0)), rtol=1e-5)
    masks = pr.wanda_masks(model, norms, 0.5)
    assert masks["0"].shape == (3, 2, 3, 3) and ((~masks["0"]).reshape(3, -1).sum(1) == 9).all()


def test_wanda_on_gpt2_runs() -> None:
    model = build_model("gpt2")
    ids = torch.arange(16).reshape(2, 8)
    norms = pr.input_norms_from_activations(model, [{"input_ids": ids}])
    report = pr.prune(model, pr.parse_format("wanda-50"), input_norms=norms)
    assert report["transformer.h.0.attn.c_attn"] == 0.5 and report["overall"] == 0.5
    assert torch.isfinite(model(input_ids=ids).logits).all()


# --- formats and errors


@pytest.mark.parametrize(
    ("name", "method", "scope", "sparsity", "then"),
    [
        ("magnitude-50", "magnitude", "global", 0.5, None),
        ("magnitude-layer-50", "magnitude", "layer", 0.5, None),
        ("snip-30", "snip", "global", 0.3, None),
        ("wanda-50", "wanda", "layer", 0.5, None),
        ("wanda-50+nf4", "wanda", "layer", 0.5, "nf4"),
        ("magnitude-5+int8", "magnitude", "global", 0.05, "int8"),
    ],
)
def test_parse_format_accepts(name: str, method: str, scope: str, sparsity: float, then: str | None) -> None:
    spec = pr.parse_format(name)
    assert (spec.method, spec.scope, spec.sparsity, spec.then, spec.name) == (method, scope, sparsity, then, name)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "magnitude-layer-<pct>"),
        ("magnitude", "magnitude-layer-<pct>"),
        ("magnitude-0", "magnitude-layer-<pct>"),
        ("magnitude-100", "magnitude-layer-<pct>"),
        ("magnitude-12.5", "whole percent"),  # a dot would split the variant's gate paths
        ("snip-50+", "magnitude-layer-<pct>"),
        ("random-50", "magnitude-layer-<pct>"),
        ("Magnitude-50", "magnitude-layer-<pct>"),
        ("wanda-layer-50", "only magnitude has a per-layer scope"),
        ("snip-50+int3", "'int3' after '+' is not a quantization format"),
    ],
)
def test_parse_format_refuses_with_one_line(name: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        pr.parse_format(name)
    assert "\n" not in str(err.value)


def test_prune_needs_its_inputs() -> None:
    for fmt, needs in (("snip-50", "loss_fn"), ("wanda-50", "input_norms")):
        with pytest.raises(ValueError, match=needs) as err:
            pr.prune(mlp(), pr.parse_format(fmt))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no input norms"):
        pr.wanda_masks(mlp(), {}, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        pr.magnitude_masks(mlp(), 1.0)
