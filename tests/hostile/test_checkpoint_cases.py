"""The battery's checkpoint cases (C1–C25 of the hostile-inputs report, issue 21): every bad checkpoint is
refused before it is audited, with one line naming the tensor, key or file and the fix; nothing it carries
runs. Each case builds its checkpoint from the tests' tiny GPT-2 and goes through what `microscope run`
calls (resolve: preflight; load_model and check_finite: ingest); the cases only the command line can show
(unreadable and looping paths) run `microscope` itself."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from microscope.errors import InputError
from microscope.models import loading
from schemas.config import ModelConfig
from tests.conftest import cli_env
from tests.hostile.common import EXIT_INPUT, copy_folder, microscope, refused, rewrite_header

PWNED = "PWNED"
W = "transformer.h.0.mlp.c_fc.weight"  # [32, 128] float32 in the tiny GPT-2


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _load(source: Path, **kw: object) -> torch.nn.Module:
    ref = loading.resolve(ModelConfig(source=str(source), **kw))
    model = loading.load_model(ref)
    loading.check_finite(model, ref)
    return model


def _tamper(edit: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    def build(base: Path, tmp: Path) -> Path:
        d = copy_folder(base, tmp / "ck")
        rewrite_header(base / "model.safetensors", d / "model.safetensors", edit)
        return d

    return build


def _set(name: str, field: str, value: object) -> Callable[[dict], None]:
    return lambda h: h[name].__setitem__(field, value)


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
    def build(base: Path, tmp: Path) -> Path:
        d = copy_folder(base, tmp / "ck")
        (d / "model.safetensors").write_bytes(edit((base / "model.safetensors").read_bytes()))
        return d

    return build


def _config(**fields: object) -> Callable[[Path, Path], Path]:
    def build(base: Path, tmp: Path) -> Path:
        d = copy_folder(base, tmp / "ck")
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **fields}))
        return d

    return build


def _poison(value: float) -> Callable[[Path, Path], Path]:
    def build(base: Path, tmp: Path) -> Path:
        d = copy_folder(base, tmp / "ck")
        state = load_file(d / "model.safetensors")
        state[W][0, :6] = value
        save_file(state, d / "model.safetensors")
        return d

    return build


def _no_tensors(base: Path, tmp: Path) -> Path:
    d = copy_folder(base, tmp / "ck")
    save_file({}, d / "model.safetensors")
    return d


def _reversed_offsets(h: dict) -> None:
    h[W]["data_offsets"] = h[W]["data_offsets"][::-1]


def _negative_offset(h: dict) -> None:
    h[W]["data_offsets"] = [-8, h[W]["data_offsets"][1]]


# case: (build the checkpoint from the tiny GPT-2 folder, what the one-line refusal says)
REFUSED: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "C1": (_bytes(lambda b: b[: len(b) // 2]), "it is truncated or corrupt"),
    "C2": (_bytes(lambda b: b""), "is not a valid safetensors file (unpack requires"),
    "C3": (_bytes(lambda b: struct.pack("<Q", 2**63) + b[8:]), "header length exceeds the file"),
    "C4": (_bytes(lambda b: b[:8] + b"\xff" * 16 + b[24:]), "is not a valid safetensors file"),
    "C5": (_tamper(_set(W, "dtype", "F16")), f"tensor '{W}' (F16 [32, 128]) needs 8192 bytes"),
    "C6": (_tamper(_set(W, "shape", [64, 128])), f"tensor '{W}' (F32 [64, 128]) needs 32768 bytes"),
    "C7": (_tamper(_set(W, "shape", [128, 32])), f"config.json does not fit the saved weights: {W}: weights [128, 32]"),
    "C8": (_tamper(_reversed_offsets), f"tensor '{W}' (F32 [32, 128]) needs 16384 bytes"),
    "C9": (_tamper(_negative_offset), f"tensor '{W}' has data_offsets [-8,"),
    "C10": (_config(n_embd=64), "config.json does not fit the saved weights: "),
    "C11": (_config(n_layer=5), "24 missing (transformer.h.3."),
    "C12": (_config(n_layer=1), "22 unexpected (transformer.h.1."),
    "C13": (_no_tensors, "does not fit its model:"),
    "C23": (_poison(float("nan")), f"hold non-finite values: {W} (6 NaN, 0 Inf)"),
    "C24": (_poison(float("inf")), f"hold non-finite values: {W} (0 NaN, 6 Inf)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_checkpoint_is_refused_naming_what_is_wrong(
    case: str, tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build, said = REFUSED[case]
    with pytest.raises(InputError) as err:
        _load(build(tiny_gpt2_dir, tmp_path))
    msg = str(err.value)
    assert said in msg and "\n" not in msg, msg
    assert any(fix in msg for fix in ("re-save", "fix ", "check ", "model.allow_")), f"no fix named: {msg}"


def test_c14_a_module_without_parameters_is_refused(tmp_path: Path) -> None:
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(InputError, match=r"builds a model with no parameters; there is nothing to audit"):
        _load(tmp_path / "empty.safetensors", module="torch.nn:Identity")


def test_c15_c16_c17_code_carrying_pickles_are_refused_and_nothing_runs(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / PWNED
    state = dict(load_file(tiny_gpt2_dir / "model.safetensors"))
    zipped = copy_folder(tiny_gpt2_dir, tmp_path / "zip")  # C15: a torch zip whose pickle calls os.system
    (zipped / "model.safetensors").unlink()
    torch.save({**state, "x": _Payload(marker)}, zipped / "pytorch_model.bin")
    legacy = copy_folder(zipped, tmp_path / "legacy")  # C16: a raw (pre-zip) pickle
    (legacy / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    bare = tmp_path / "evil.pt"  # C17: a bare state dict
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, bare)
    for source, kw, said in (
        (zipped, {}, "it is a pickle that needs arbitrary code to load"),
        (legacy, {}, "is not a readable PyTorch state dict"),
        (bare, {"module": "torch.nn:Linear", "kwargs": {"in_features": 2, "out_features": 1}}, "needs arbitrary code"),
    ):
        with pytest.raises(InputError, match="re-save") as err:
            _load(source, **kw)
        assert said in str(err.value)
    assert not marker.exists()


def test_c18_remote_code_in_config_is_never_run(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    d = copy_folder(tiny_gpt2_dir, tmp_path / "remote")
    marker = tmp_path / PWNED
    (d / "evilcfg.py").write_text(f"import os\nos.system('touch {marker}')\n")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "evilcfg.EvilConfig"}}))
    model = _load(d)  # audited as the GPT-2 its weights are; the module is never imported
    assert type(model).__name__ == "GPT2LMHeadModel" and not marker.exists()


def test_c19_a_looping_model_link_is_no_hub_id(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    os.symlink("loop", tmp_path / "ck" / "loop")
    (tmp_path / "ck" / "loop").unlink()
    os.symlink(tmp_path / "ck" / "loop", tmp_path / "ck" / "loop")
    with pytest.raises(InputError, match="is a symbolic link that loops or leads nowhere; point it at the checkpoint"):
        _load(tmp_path / "ck" / "loop")


def _drop_root_powers(args: list[str]) -> list[str]:
    """`microscope ARGS` run without root's power to read what it may not (we run the tests as root)."""
    if shutil.which("capsh") is None:
        pytest.skip("capsh is not installed: permission bits do not apply to root")
    cmd = " ".join(f"'{a}'" for a in args)
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", cmd]


def test_c20_c21_c22_unreadable_or_looping_files_get_one_line(
    tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    """Through the command line: an OSError from the file system is one line with the fix, exit 2, no
    traceback (the warm process is not used: it would read with its own powers)."""
    import subprocess

    from tests.conftest import VENV_BIN

    loop = copy_folder(tiny_gpt2_dir, tmp_path / "loop-inner")  # C20: the weights file is a looping link
    (loop / "model.safetensors").unlink()
    os.symlink(loop / "model.safetensors", loop / "model.safetensors")
    noperm = copy_folder(tiny_gpt2_dir, tmp_path / "noperm")  # C21: the folder is unreadable
    noperm_file = copy_folder(tiny_gpt2_dir, tmp_path / "noperm-file")  # C22: the weights file is
    os.chmod(noperm_file / "model.safetensors", 0)
    os.chmod(noperm, 0)
    os.chmod(tmp_path, 0o755)  # the test's folder itself stays reachable
    env = {k: v for k, v in cli_env(tmp_path, None).items() if k != "MICROSCOPE_WARM_SOCKET"}
    try:
        for model, said in (
            (loop, "a symbolic link loops"),
            (noperm, "permission is denied"),
            (noperm_file, "permission is denied"),
        ):
            args = [str(VENV_BIN / "microscope"), "run", "--model", str(model), "--dataset", str(corpus_file)]
            cmd = args if model == loop else _drop_root_powers(args)
            p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            refused(p, EXIT_INPUT, said)
    finally:
        os.chmod(noperm, 0o755)


def test_cli_refuses_a_tampered_checkpoint_before_anything_runs(
    tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    """The same refusal through `microscope run`: exit 2 and the one line, before any stage or server."""
    d = _tamper(_set(W, "dtype", "F16"))(tiny_gpt2_dir, tmp_path)
    p = microscope(["run", "--model", str(d), "--dataset", str(corpus_file)], cli_env(tmp_path, None), tmp_path)
    refused(p, EXIT_INPUT, "is not a valid safetensors file", "needs 8192 bytes")
    assert "temporary server" not in p.stderr  # refused before Prefect was needed
