"""Quantized variants: they load, run, save and reload; their memory is what we estimate; errors say
what to do; out-of-memory falls back along the chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from microscope import quantization as qz
from microscope.errors import InputError
from microscope.models import loading
from microscope.stages.quantize import fidelity
from microscope.trace import resolve_points
from schemas.config import ConfigError, ModelConfig, QuantizeConfig, load_config
from tests.conftest import build_model

QCFG = QuantizeConfig()


# Width 64: bitsandbytes' CPU 4-bit kernel works in 64-wide blocks (narrower models get a clear error).
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
    kinds = {type(m) for m in model.modules()}
    assert (bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit) in kinds
    files = qz.save_variant(model, fmt, tmp_path / "v")  # before the first forward, as the stage does
    assert any(f.suffix == ".safetensors" for f in files)
    with torch.inference_mode():
        out = model(input_ids=ids()).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(input_ids=ids()).logits, out, atol=0, rtol=0)  # deterministic
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v", device_map="cpu")
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
    with pytest.raises(ConfigError, match=r"unknown format\(s\) \['int3'\]; choose from int8, nf4"):
        load_config(tmp_path / "c.yaml")


def test_4bit_on_cpu_needs_64_wide_layers(tmp_path: Path) -> None:
    build_model("gpt2").save_pretrained(tmp_path / "narrow")  # width 32
    with pytest.raises(InputError, match="input width divisible by 64.*has 32; use int8 or torch-int8"):
        qz.load_variant(ref_for(tmp_path / "narrow"), "nf4", QCFG)


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

    def nf4_runs_out(ref, fmt, cfg, device="cpu"):
        if fmt == "nf4":
            raise qz.VariantOOM("nf4: out of memory while loading (CUDA out of memory)")
        return real(ref, fmt, cfg, device)

    monkeypatch.setattr(qz, "load_variant", nf4_runs_out)
    model, made, attempts = qz.produce(ref, "nf4", QuantizeConfig(fallback={"nf4": ["fp4"]}), loading.load_model(ref))
    assert made == "fp4" and attempts == [
        {"format": "nf4", "error": "nf4: out of memory while loading (CUDA out of memory)"}
    ]
