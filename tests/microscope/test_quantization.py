"""Quantized variants: they load, run, save and reload; their memory is what we estimate; errors say
what to do; out-of-memory falls back along the chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from microscope import quantization as qz
from microscope.errors import InputError
from microscope.fidelity import fidelity
from microscope.models import loading
from microscope.native_int8 import linear_weight
from microscope.quant4bit import dequantize_matmul
from microscope.trace import resolve_points
from schemas.config import ConfigError, ModelConfig, QuantizeConfig, load_config
from tests.conftest import build_model

QCFG = QuantizeConfig()


# Width 64, the widths bitsandbytes' CPU 4-bit kernel takes (odd widths: odd_dir below).
WIDE = {"gpt2": {"n_embd": 64}, "llama": {"hidden_size": 64, "intermediate_size": 128}}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_model(request.param, **WIDE[request.param]).save_pretrained(out)
    return out


def ref_for(path: Path, **kw) -> object:
    return loading.resolve(ModelConfig(source=str(path), **kw))


def ids(n: int = 4, s: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 512, (n, s)))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_bitsandbytes_variant_loads_runs_saves_and_reloads(fmt: str, hf_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = qz.load_variant(ref_for(hf_dir), fmt, QCFG)
    assert any(isinstance(m, bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit) for m in model.modules())
    files = qz.save_variant(model, fmt, tmp_path / "v")  # before the first forward, as the stage does
    assert any(f.suffix == ".safetensors" for f in files)
    with torch.inference_mode():
        out = model(input_ids=ids()).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(input_ids=ids()).logits, out, atol=0, rtol=0)  # deterministic
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v", device_map="cpu")
    if fmt == "nf4":  # as load_variant runs it on CPU (bitsandbytes' own kernel differs by host)
        assert dequantize_matmul(reloaded) == qz.kernel_paths(model)["dequantize-matmul"]
    with torch.inference_mode():
        again = reloaded(input_ids=ids()).logits
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "torch-int8"])
def test_torch_variants_run_and_save(fmt: str, hf_dir: Path, tmp_path: Path) -> None:
    model = qz.load_variant(ref_for(hf_dir), fmt, QCFG)
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids()).logits.float()).all()
    files = qz.save_variant(model, fmt, tmp_path / "v")
    assert sum(f.stat().st_size for f in files) > 0


def test_fp16_activations_stay_within_cosine_1e_4(hf_dir: Path) -> None:
    ref = ref_for(hf_dir)
    fp = loading.load_model(ref)
    arch = loading.describe(fp)
    points = resolve_points(arch.hook_points, [0, 1, 2], ["resid", "mlp", "attn"], arch.family)
    logit_stats, drift = fidelity(fp, qz.load_variant(ref, "fp16", QCFG), ids().numpy(), points, 2, True)
    assert len(drift) == 9
    assert min(d["cosine"] for d in drift.values()) >= 0.9999, drift
    assert logit_stats["top1_agreement"] > 0.9


def test_variant_against_itself_has_zero_kl(hf_dir: Path) -> None:
    ref = ref_for(hf_dir)
    fp = loading.load_model(ref)
    arch = loading.describe(fp)
    points = resolve_points(arch.hook_points, [1], ["resid"], arch.family)
    stats, drift = fidelity(fp, loading.load_model(ref), ids().numpy(), points, 2, True)
    assert stats["kl_mean"] == 0 and stats["top1_agreement"] == 1 and stats["delta_ppl"] == 0
    assert drift["blocks.1.hook_resid_post"]["rel_error"] == 0


@pytest.mark.parametrize("fmt", ["int8", "nf4", "fp4", "fp16", "bf16", "torch-int8"])
def test_estimated_memory_within_20_percent_of_measured(fmt: str, hf_dir: Path) -> None:
    ref = ref_for(hf_dir)
    fp = loading.load_model(ref)
    est = qz.estimate_bytes(fp, fmt, QCFG)
    measured = qz.measured_bytes(qz.load_variant(ref, fmt, QCFG))
    assert abs(measured - est) <= 0.2 * measured, (fmt, est, measured)
    assert measured < qz.measured_bytes(fp)


def test_unsupported_and_unknown_formats(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="'int2' is unsupported here: no maintained 2-bit library"):
        qz.load_variant(ref_for(hf_dir), "int2", QCFG)
    (tmp_path / "c.yaml").write_text("quantize:\n  formats: [int8, int3]\n")
    with pytest.raises(ConfigError, match=r"unknown format 'int3'; choose from int8, nf4"):
        load_config(tmp_path / "c.yaml")


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama no layer of which is a multiple of 64 wide (in 96, MLP 160, k/v out 48)."""
    out = tmp_path_factory.mktemp("tiny-llama-96")
    build_model("llama", hidden_size=96, intermediate_size=160).save_pretrained(out)
    return out


def numpy_dequantize_4bit(packed: torch.Tensor, state: Any) -> np.ndarray:
    """The 4-bit format's definition in NumPy: two codes a byte (high nibble first), code value × the absmax
    of its block of 64 over the flattened weight; a nested absmax is 8-bit codes × their block's absmax +
    offset. (bitsandbytes' own CPU `dequantize_4bit` takes blocks along rows on AVX512 hosts: not a reference.)"""
    absmax = state.absmax.numpy().astype(np.float64)
    if state.nested:
        s2 = state.state2
        scale = np.repeat(s2.absmax.numpy().astype(np.float64), s2.blocksize)[: absmax.size]
        absmax = s2.code.numpy().astype(np.float64)[state.absmax.numpy().astype(np.int64)] * scale + float(state.offset)
    b = packed.numpy().reshape(-1)
    codes = np.stack([b >> 4, b & 15], axis=1).reshape(-1)
    n = int(np.prod(state.shape))
    values = state.code.numpy().astype(np.float64)[codes[:n]] * np.repeat(absmax, state.blocksize)[:n]
    return values.reshape(tuple(state.shape))


def round_trip_reference(path: Path, fmt: str, double_quant: bool) -> torch.nn.Module:
    """The full-precision model with every quantizable weight replaced by its 4-bit round trip: quantized
    by bitsandbytes, dequantized in NumPy (`numpy_dequantize_4bit`): blocks of 64 over the flattened
    [out, in] weight."""
    from bitsandbytes.functional import quantize_4bit

    model = loading.load_model(ref_for(path))
    for name in qz.quantizable(model):
        mod = model.get_submodule(name)
        w = linear_weight(mod)[0].contiguous()  # [out, in]; a Conv1D stores the transpose
        packed, state = quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=double_quant)
        w_q = torch.from_numpy(numpy_dequantize_4bit(packed, state)).to(w.dtype)
        with torch.no_grad():
            mod.weight.copy_(w_q if isinstance(mod, torch.nn.Linear) else w_q.t())
    return model.requires_grad_(False)


@pytest.mark.parametrize(("fmt", "double_quant"), [("nf4", True), ("fp4", False)])
def test_4bit_on_cpu_any_width_equals_its_dequantized_weights(fmt: str, double_quant: bool, odd_dir: Path) -> None:
    cfg = QuantizeConfig(double_quant=double_quant)
    model = qz.load_variant(ref_for(odd_dir), fmt, cfg)
    assert qz.kernel_paths(model) == {"dequantize-matmul": 21}  # 3 blocks × (q, k, v, o, gate, up, down)
    held = qz.measured_bytes(model)
    with torch.inference_mode():
        out = model(input_ids=ids()).logits
        want = round_trip_reference(odd_dir, fmt, double_quant)(input_ids=ids()).logits
    # Same weights, same float matmul: only summation order may differ.
    torch.testing.assert_close(out, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    # The float weights live only during a forward: the variant still holds 4-bit storage.
    assert qz.measured_bytes(model) == held
    assert abs(held - qz.estimate_bytes(loading.load_model(ref_for(odd_dir)), fmt, cfg)) <= 0.2 * held


@pytest.mark.parametrize("which", ["gpt2-64", "llama-64", "llama-96"])
def test_gradients_flow_through_nf4_on_cpu(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    family, width = which.split("-")
    path = request.getfixturevalue("odd_dir") if width == "96" else tmp_path / "m"
    if width == "64":
        build_model(family, **WIDE[family]).save_pretrained(path)
    model = qz.load_variant(ref_for(path), "nf4", QCFG)
    # bitsandbytes takes its repacking bf16 kernel, without autograd, in eval mode on CPUs with
    # AVX512-BF16; claim this host has it, so the test covers those hosts too.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    with torch.inference_mode():
        model(input_ids=ids())  # a fidelity pass before the attacks, as in an audit
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )

    reference = round_trip_reference(path, "nf4", QCFG.double_quant)
    labels = ids()[:, 1:]
    grads = []
    for m in (model, reference):
        emb = m.get_input_embeddings()(ids()).detach().requires_grad_(True)  # the attack surface
        logits = m(inputs_embeds=emb).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        grads.append(emb.grad)
    assert grads[0] is not None and torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * float(grads[1].abs().max()), rtol=0)


def test_model_without_linear_layers(tmp_path: Path) -> None:
    from tests.toy_models import ToyConvNet

    save_file(ToyConvNet().state_dict(), tmp_path / "conv.safetensors")
    ref = ref_for(tmp_path / "conv.safetensors", module="tests.toy_models:ToyConvNet")
    with pytest.raises(InputError, match="has no Linear layers to quantize to torch-int8.*use fp16 or bf16"):
        qz.load_variant(ref, "torch-int8", QCFG)
    with pytest.raises(InputError, match="needs an HF checkpoint folder"):
        qz.load_variant(ref, "nf4", QCFG)
    assert qz.load_variant(ref, "fp16", QCFG).embed.weight.dtype == torch.float16


def test_out_of_memory_falls_back_along_the_chain(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ref_for(hf_dir)
    fp = loading.load_model(ref)
    # Which of the two is larger depends on how much of the model is embeddings (never quantized).
    big, small = sorted(["fp16", "torch-int8"], key=lambda f: -qz.estimate_bytes(fp, f, QCFG))
    need_big, need_small = qz.estimate_bytes(fp, big, QCFG), qz.estimate_bytes(fp, small, QCFG)
    assert need_small < need_big
    # A machine with room for the smaller variant only (free memory is the only thing faked here).
    monkeypatch.setattr(qz, "free_bytes", lambda device: (need_big + need_small) // 2)
    cfg = QuantizeConfig(memory_fraction=1.0, fallback={big: [small]})
    model, made, attempts = qz.produce(ref, big, cfg, fp)
    assert made == small and attempts[0]["format"] == big and "needs ~" in attempts[0]["error"]
    monkeypatch.setattr(qz, "free_bytes", lambda device: 10)
    with pytest.raises(qz.VariantOOM, match=f"no variant of {big} fits in memory"):
        qz.produce(ref, big, cfg, fp)


def test_oom_while_loading_falls_back(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ref_for(hf_dir)
    real = qz.load_variant

    def nf4_runs_out(ref, fmt, cfg, device="cpu", calibration=None):
        if fmt == "nf4":
            raise qz.VariantOOM("nf4: out of memory while loading (CUDA out of memory)")
        return real(ref, fmt, cfg, device, calibration)

    monkeypatch.setattr(qz, "load_variant", nf4_runs_out)
    model, made, attempts = qz.produce(ref, "nf4", QuantizeConfig(fallback={"nf4": ["fp4"]}), loading.load_model(ref))
    assert made == "fp4" and attempts == [
        {"format": "nf4", "error": "nf4: out of memory while loading (CUDA out of memory)"}
    ]
