"""Pruned variants are quantize formats: the config names them, they load as the masked model computed
directly with microscope.pruning (so every per-variant stage sees the same weights), their fidelity equals
the directly masked model's, and they combine with quantization after pruning."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from microscope import pruning
from microscope import quantization as qz
from microscope.errors import InputError
from microscope.fidelity import fidelity
from microscope.models import loading
from microscope.trace import resolve_points
from schemas.config import ModelConfig, QuantizeConfig
from tests.conftest import build_model

QCFG = QuantizeConfig()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gpt2-prune")
    build_model("gpt2", n_embd=64).save_pretrained(out)
    return out


def ref_for(path: Path) -> object:
    return loading.resolve(ModelConfig(source=str(path)))


def windows(n: int = 4, s: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, (n, s))


def calibration() -> pruning.Calibration:
    x = torch.from_numpy(windows(8, 16))

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return model(input_ids=x, labels=x, use_cache=False).loss

    return pruning.Calibration(loss, [{"input_ids": x[:4]}, {"input_ids": x[4:]}], "", "8 windows")


@pytest.mark.parametrize(
    ("ok", "why"),
    [
        ("magnitude-50", None),
        ("wanda-50+nf4", None),
        ("magnitude-layer-30+torch-int8", None),
        ("magnitude-12.5", "whole percent"),
        ("wanda-layer-50", "only magnitude has a per-layer scope"),
        ("snip-50+int3", "'int3' after '+' is not a quantization format"),
        ("prune-50", "choose from int8"),
    ],
)
def test_the_config_names_pruning_formats(ok: str, why: str | None) -> None:
    if why is None:
        assert QuantizeConfig(formats=[ok]).formats == [ok]
        qz.check_format(ok)
    else:
        with pytest.raises(ValueError, match=re.escape(why)):
            QuantizeConfig(formats=[ok])
        with pytest.raises(InputError, match=re.escape(why)):
            qz.check_format(ok)


@pytest.mark.parametrize("fmt", ["magnitude-50", "magnitude-layer-50", "snip-30", "wanda-50"])
def test_a_pruned_variant_is_the_directly_masked_model(fmt: str, gpt2_dir: Path) -> None:
    ref = ref_for(gpt2_dir)
    variant = qz.load_variant(ref, fmt, QCFG, "cpu", calibration)
    fp = loading.load_model(ref, "cpu").eval()
    direct = copy.deepcopy(fp)
    spec = pruning.parse_format(fmt)
    cal = calibration()
    if spec.method == "magnitude":
        masks = pruning.magnitude_masks(direct, spec.sparsity, spec.scope)
    elif spec.method == "snip":
        masks = pruning.snip_masks(direct, cal.loss_fn, spec.sparsity)
    else:
        masks = pruning.wanda_masks(direct, pruning.input_norms_from_activations(direct, cal.batches), spec.sparsity)
    with torch.no_grad():
        for name, mask in masks.items():  # the reference: W ⊙ m by hand, no torch.nn.utils.prune
            direct.get_submodule(name).weight.mul_(mask)
    got, want = variant.state_dict(), direct.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the exact count: ⌊s·N⌋ over the pruned matrices (global) or per matrix (layer, row)
    report = variant.microscope_pruning
    mats = pruning.prunable(fp)
    n_total = sum(m.weight.numel() for m in mats.values())
    zeros = sum(int((~masks[n]).sum()) for n in mats)
    if spec.scope == "global":
        assert zeros == int(spec.sparsity * n_total)
    assert report["overall"] == pytest.approx(zeros / n_total, abs=1e-12)
    assert "lm_head" not in report and report["note"] == pruning.NOTE

    # fidelity figures of the variant equal those of the directly masked model
    arch = loading.describe(fp)
    points = resolve_points(arch.hook_points, [0, 1], ["resid"], arch.family)
    a_stats, a_drift = fidelity(fp, variant, windows(), points, 2, True)
    b_stats, b_drift = fidelity(fp, direct, windows(), points, 2, True)
    assert a_stats == pytest.approx(b_stats, rel=1e-6, abs=1e-9)
    assert a_drift == b_drift
    assert a_stats["kl_mean"] > 0  # pruning half the weights changes the function


def test_prune_then_quantize(gpt2_dir: Path) -> None:
    ref = ref_for(gpt2_dir)
    fp = loading.load_model(ref, "cpu")
    variant = qz.load_variant(ref, "magnitude-50+torch-int8", QCFG, "cpu")
    assert qz.kernel_paths(variant) == {qz.DEQUANTIZE_MATMUL: len(qz.quantizable(fp))}
    assert variant.microscope_pruning["overall"] == pytest.approx(0.5, abs=1e-3)
    assert qz.estimate_bytes(fp, "magnitude-50+torch-int8", QCFG) == qz.estimate_bytes(fp, "torch-int8", QCFG)
    assert qz.estimate_bytes(fp, "magnitude-50", QCFG) == qz.measured_bytes(fp)  # stored dense
    nf4 = qz.load_variant(ref, "wanda-50+nf4", QCFG, "cpu", calibration)
    with torch.no_grad():
        logits = nf4(input_ids=torch.from_numpy(windows())).logits
    assert torch.isfinite(logits).all() and qz.kernel_paths(nf4)
    assert "then bitsandbytes 4-bit NormalFloat" in qz.format_info("wanda-50+nf4").description


def test_snip_on_an_encoder_is_refused_in_one_line(tmp_path: Path) -> None:
    build_model("bert").save_pretrained(tmp_path)
    cal = pruning.Calibration(None, [], "an encoder without a head has no loss", "")
    with pytest.raises(InputError, match="SNIP needs a loss and an encoder without a head has no loss") as err:
        qz.load_variant(ref_for(tmp_path), "snip-50", QCFG, "cpu", lambda: cal)
    assert "\n" not in str(err.value)
