"""microscope/sae/external.py: SAELens SAEs read back so that our encode/decode equal SAELens' own, what
is refused in one line, and `attach`'s checks against a hand-built audit record."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from microscope.errors import InputError
from microscope.sae.external import read_saelens

D_IN, D_SAE = 12, 40


def saelens_sae(arch: str, **cfg: Any) -> Any:
    """A SAELens inference SAE of `arch` with random weights (biases and thresholds too)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    cls, cfg_cls = {
        "standard": (StandardSAE, StandardSAEConfig),
        "topk": (TopKSAE, TopKSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    }[arch]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b") else 1.0))
        if arch == "jumprelu":  # some negative: SAELens' relu then decides, as our folded threshold must
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 2 - 0.5)
    return sae


CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": 5}),
    ("topk", {"k": 7, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize(("arch", "cfg"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_encode_decode_equal_saelens(tmp_path: Path, arch: str, cfg: dict[str, Any]) -> None:
    ref = saelens_sae(arch, **cfg)
    ref.save_model(tmp_path / "sae")
    ours = read_saelens(tmp_path / "sae")
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        acts_ref, acts = ref.encode(x), ours.encode(x)
        torch.testing.assert_close(acts, acts_ref, atol=1e-5, rtol=1e-5)
        assert ((acts > 0) == (acts_ref > 0)).all()  # the same features fire
        assert 0 < (acts > 0).float().mean() < 1
        torch.testing.assert_close(ours.decode(acts_ref), ref.decode(acts_ref), atol=1e-5, rtol=1e-5)
    assert ours.cfg["architecture"] == arch and ours.cfg["d_in"] == D_IN and ours.cfg["d_sae"] == D_SAE
    if arch == "topk":
        assert ours.cfg["k"] == cfg["k"]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_exported_files_read_back_by_saelens_and_io(tmp_path: Path, arch: str) -> None:
    """The folded weights, saved as attach saves them, are read by io.load and by SAELens alike."""
    from sae_lens import SAE
    from safetensors.torch import save_file

    from microscope.sae import io

    kw = {"k": 4, "rescale_acts_by_decoder_norm": True} if arch == "topk" else {}
    ref = saelens_sae(arch, apply_b_dec_to_input=False, **kw)
    ref.save_model(tmp_path / "src")
    ours = read_saelens(tmp_path / "src")
    (tmp_path / "out").mkdir()
    save_file(dict(ours.state_dict()), tmp_path / "out" / "sae_weights.safetensors")
    (tmp_path / "out" / "cfg.json").write_text(json.dumps(ours.cfg))
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.encode(x)
        torch.testing.assert_close(io.load(tmp_path / "out").encode(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(SAE.load_from_disk(tmp_path / "out").encode(x), want, atol=1e-5, rtol=1e-5)


def _saved(tmp_path: Path, arch: str = "standard", **cfg: Any) -> Path:
    saelens_sae(arch, **cfg).save_model(tmp_path / "sae")
    return tmp_path / "sae"


def _edit_cfg(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | changes))


def _refused(folder: Path, *words: str) -> None:
    with pytest.raises(InputError) as e:
        read_saelens(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_refuses_missing_files(tmp_path: Path) -> None:
    _refused(tmp_path, "cfg.json and sae_weights.safetensors missing")
    folder = _saved(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    _refused(folder, "sae_weights.safetensors missing")


def test_refuses_unsupported_architecture(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_cfg(folder, architecture="gated")
    _refused(folder, "'gated' is not supported", "standard, topk, jumprelu")


@pytest.mark.parametrize("norm", ["layer_norm", "expected_average_only_in", "constant_norm_rescale"])
def test_refuses_normalization(tmp_path: Path, norm: str) -> None:
    folder = _saved(tmp_path)
    _edit_cfg(folder, normalize_activations=norm)
    _refused(folder, f"normalize_activations {norm!r} is not supported")


def test_refuses_shape_inconsistencies(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_cfg(folder, d_in=D_IN + 1)
    _refused(folder, "W_enc is [12, 40], expected [13, 40]")
    folder = _saved(tmp_path / "b", "jumprelu")
    from safetensors.torch import load_file, save_file

    w = load_file(folder / "sae_weights.safetensors")
    del w["threshold"]
    save_file(w, folder / "sae_weights.safetensors")
    _refused(folder, "missing threshold")


def test_refuses_malformed(tmp_path: Path) -> None:
    folder = _saved(tmp_path, "topk", k=5)
    _edit_cfg(folder, k=D_SAE + 1)
    _refused(folder, "needs an integer k from 1 to d_sae=40")
    (folder / "cfg.json").write_text("{not json")
    _refused(folder, "is not JSON")
    folder = _saved(tmp_path / "b")
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    _refused(folder, "unreadable as safetensors")
    folder = _saved(tmp_path / "c")
    _edit_cfg(folder, reshape_activations="hook_z")
    _refused(folder, "hook_z")


def test_reads_pre_6_topk_config(tmp_path: Path) -> None:
    """SAELens < 6 wrote no architecture and kept k in activation_fn_kwargs."""
    ref = saelens_sae("topk", k=3)
    folder = tmp_path / "sae"
    ref.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("architecture", "k", "metadata"):
        cfg.pop(key)
    cfg |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "hook_point": "blocks.0.hook_resid_post"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    ours = read_saelens(folder)
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)


# attach's checks, on a hand-built record (the end-to-end import: tests/flows/test_sae_import_e2e.py)


def _audit(tmp_path: Path, width: int = D_IN) -> tuple[Any, str]:
    from microscope import audits
    from microscope.store import LocalStore
    from schemas.records import Architecture, AuditRecord, ModelRef, StageRecord, StageStatus

    store = LocalStore(tmp_path / "store")
    trace = StageRecord(
        stage="trace",
        status=StageStatus.completed,
        config_hash="t",
        details={"datasets": {"blocks.0.hook_resid_post": {"module": "h.0", "d": width, "parts": []}}},
    )
    rec = AuditRecord(
        audit_id="a1",
        created_at=datetime.now(UTC),
        status=StageStatus.completed,
        model=ModelRef(source="x", source_fingerprint="0" * 64),
        model_digest="0" * 64,
        architecture=Architecture(family="gpt2", class_name="GPT2", n_layers=1, n_params=1, dtype="float32"),
        config={},
        stages={"trace": trace, "ingest": StageRecord(stage="ingest", status=StageStatus.completed)},
        store_uri=store.uri,
    )
    audits.save(store, rec)
    return store, "a1"


def _attach_refused(tmp_path: Path, hook: str, width: int, *words: str) -> None:
    from microscope.sae.external import attach

    store, audit_id = _audit(tmp_path, width)
    with pytest.raises(InputError) as e:
        attach(store, audit_id, hook, _saved(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_attach_refuses_untraced_hook(tmp_path: Path) -> None:
    _attach_refused(
        tmp_path, "blocks.3.hook_resid_post", D_IN, "did not trace blocks.3.hook_resid_post", "blocks.0.hook_resid_post"
    )


def test_attach_refuses_width_mismatch(tmp_path: Path) -> None:
    _attach_refused(tmp_path, "blocks.0.hook_resid_post", D_IN + 4, "d_in=12", "16 wide")
