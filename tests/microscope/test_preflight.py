"""`microscope.preflight`: the header-only estimate against the real models built and loaded (tiny GPT-2, the
digits CNN). Parameter counts equal `sum(p.numel())` of the loaded model exactly; weight bytes per format equal
`quantization.estimate_bytes` on the loaded model within 1 byte (both truncate a float sum to int, summed in
another order); the trace size equals its closed form; bad input is one line and nothing is unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from microscope import preflight, quantization
from microscope.errors import InputError
from schemas.config import AuditConfig

FORMATS = ["int8", "nf4", "fp4", "fp16", "bf16", "torch-int8", "magnitude-50", "wanda-50+nf4", "snip-30+fp16"]


def _cfg(**sections: dict) -> AuditConfig:
    return AuditConfig.model_validate({"quantize": {"formats": FORMATS}, **sections})


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()


@pytest.fixture(scope="module")
def cnn(digits_cnn: tuple[Path, Path]):
    from safetensors.torch import load_file

    from microscope.models.vision import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(load_file(str(digits_cnn[0])))
    return model.eval()


@pytest.mark.parametrize("double_quant", [True, False])
def test_gpt2_counts_and_bytes_match_the_loaded_model(
    tiny_gpt2_dir: Path, gpt2, tmp_path: Path, double_quant: bool
) -> None:
    cfg = _cfg(quantize={"formats": FORMATS, "double_quant": double_quant})
    pf = preflight.estimate(str(tiny_gpt2_dir), cfg, str(tmp_path / "store"))
    n = sum(p.numel() for p in gpt2.parameters())  # tied wte / lm_head counted once, as in the file
    assert pf.parameters.value == n
    assert pf.dtypes == {"F32": n}
    assert pf.weights[preflight.FP].value == 4 * n  # model.dtype float32
    for fmt in FORMATS:
        want = quantization.estimate_bytes(gpt2, fmt, cfg.quantize)
        assert abs(pf.weights[fmt].value - want) <= 1, (fmt, pf.weights[fmt].value, want)
        assert pf.weights[fmt].why
    assert not (tmp_path / "store").exists()  # the free disk is measured where the store will be, not made


def test_cnn_state_dict_counts_and_bytes_match_the_loaded_model(digits_cnn: tuple[Path, Path], cnn, tmp_path) -> None:
    cfg = _cfg(model={"dtype": "bfloat16"})
    pf = preflight.estimate(str(digits_cnn[0]), cfg, str(tmp_path))
    n = sum(p.numel() for p in cnn.parameters())
    assert pf.parameters.value == n
    assert pf.weights[preflight.FP].value == 2 * n  # loaded in bfloat16
    for fmt in FORMATS:
        want = quantization.estimate_bytes(cnn, fmt, cfg.quantize)
        assert abs(pf.weights[fmt].value - want) <= 1, (fmt, pf.weights[fmt].value, want)
    assert pf.trace.value is None and "config.json" in pf.trace.why  # a bare state dict: no architecture yet


def test_sharded_checkpoint_reads_every_shard(gpt2, tmp_path: Path) -> None:
    gpt2.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    pf = preflight.estimate(str(tmp_path / "sharded"), _cfg(), str(tmp_path))
    assert pf.parameters.value == sum(p.numel() for p in gpt2.parameters())
    assert pf.weights["nf4"].value == pytest.approx(quantization.estimate_bytes(gpt2, "nf4", _cfg().quantize), abs=1)


def test_trace_size_is_the_closed_form(tiny_gpt2_dir: Path, gpt2, tmp_path: Path) -> None:
    cfg = _cfg(
        dataset={"seq_len": 32, "max_tokens": 1000},
        trace={"layers": [0, -1], "hooks": ["resid", "mlp"]},
        quantize={"formats": ["fp16", "nf4"]},
    )
    pf = preflight.estimate(str(tiny_gpt2_dir), cfg, str(tmp_path))
    d = gpt2.config.n_embd
    tokens = 31 * 32  # whole windows of 32 within 1000 tokens
    # per token: d float32 + window, position, doc_id, token_id (int32); 2 layers × 2 hooks × (fp + 2 variants)
    assert pf.trace.value == tokens * (4 * d + 16) * 2 * 2 * 3
    untraced = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"trace_variants": False})})
    assert preflight.estimate(str(tiny_gpt2_dir), untraced, str(tmp_path)).trace.value == tokens * (4 * d + 16) * 4


def test_recommends_the_most_faithful_format_that_fits(tiny_gpt2_dir: Path, gpt2, tmp_path: Path) -> None:
    import psutil

    fp32 = 4 * sum(p.numel() for p in gpt2.parameters())
    # a memory share that holds 3/4 of the fp32 weights: fp32 does not fit, fp16 (half of them) does
    fraction = 0.75 * fp32 / psutil.virtual_memory().available
    cfg = _cfg(quantize={"formats": ["nf4"], "memory_fraction": fraction})
    pf = preflight.estimate(str(tiny_gpt2_dir), cfg, str(tmp_path))
    assert pf.recommended == "fp16" and "model.dtype" in pf.recommendation
    assert any("does not fit" in w for w in pf.warnings)
    roomy = preflight.estimate(str(tiny_gpt2_dir), _cfg(), str(tmp_path))
    assert roomy.recommended is None and "fits" in roomy.recommendation and not roomy.warnings
    assert roomy.free_memory.value > 0 and roomy.free_disk.value > 0


class _Boom:
    """A pickle that writes a file when unpickled: proof that nothing here unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    cfg = _cfg()
    with pytest.raises(InputError, match="does not exist") as e:
        preflight.estimate(str(tmp_path / "nowhere"), cfg, str(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weight files"):
        preflight.estimate(str(tmp_path / "empty"), cfg, str(tmp_path))
    marker = tmp_path / "marker"
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(InputError, match="cannot be estimated without loading"):
        preflight.estimate(str(tmp_path / "pickled"), cfg, str(tmp_path))
    with pytest.raises(InputError, match="cannot be estimated without loading"):
        preflight.estimate(str(tmp_path / "pickled" / "pytorch_model.bin"), cfg, str(tmp_path))
    assert not marker.exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(InputError, match="not a valid safetensors"):
        preflight.estimate(str(tmp_path / "bad.safetensors"), cfg, str(tmp_path))
    with pytest.raises(InputError, match="model: no model"):
        preflight.estimate("  ", cfg, str(tmp_path))


def test_remote_models_are_unknown_until_fetched(tmp_path: Path) -> None:
    pf = preflight.estimate("nobody-here/not-a-model", _cfg(), str(tmp_path))
    assert pf.parameters.value is None and "unknown until downloaded" in pf.parameters.why
    assert set(pf.weights) == {preflight.FP, *FORMATS}
    s3 = preflight.estimate("s3://bucket/ckpt", _cfg(), "s3://bucket/store")
    assert s3.parameters.value is None and "local only" in s3.parameters.why
    assert s3.free_disk.value is None and "remote" in s3.free_disk.why
