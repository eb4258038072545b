"""The battery's config and command-line cases (G1–G19 and L1–L22 of the hostile-inputs report, issue 21):
every bad config, rule file, id, path or option is refused with exit 2 and one line naming it and the fix,
before anything runs. The commands run in-process through `flows.cli.main` (what the `microscope` script
calls) on a store of hand-written audit records; the two cases that need root's powers dropped run the
script itself."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import VENV_BIN, cli_env
from tests.hostile.common import EXIT_INPUT, refused

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"

# case: (config file text, what the refusal says)
CONFIGS: dict[str, tuple[str, str]] = {
    "G1": ("dataset: {seq_len: abc}\nsae: {lr: fast}\n", "dataset.seq_len: Input should be a valid integer"),
    "G2": ("dataset: {seq_len: 0}\n", "dataset.seq_len: Input should be greater than or equal to 2 (got 0)"),
    "G3": ("robustness: {samples: 0}\n", "robustness.samples: Input should be greater than or equal to 2"),
    "G4": ("sae: {epochs: 0}\n", "sae.epochs: Input should be greater than or equal to 1 (got 0)"),
    "G9": (BOMB, "line 2: YAML aliases (*name) are not accepted"),
    "G10": ("seed: " + BOMB.replace("\n", "\n  ").replace("a: &a", "{}\nx:\n  a: &a"), "YAML aliases"),
    "G11": ("model:\n  kwargs:\n    " + BOMB.replace("\n", "\n    "), "YAML aliases (*name) are not accepted"),
    "G12": ("- dataset\n- trace\n", "must hold a mapping of sections"),
    "G13": ("gate:\n  rules: [{metric: layers.*.alpha, check: frobnicate 3}]\n", "check 'frobnicate 3' is not under"),
    "G14": ("gate:\n  rules: [{metric: layers.*.alpha, check: '<= 3', severity: apocalyptic}]\n", "severity"),
    "G15": ("gate:\n  rules: no-such-rules-file\n", "gate rules no-such-rules-file not found"),
    "G16": ("gate:\n  rules: [{metric: layers.*.nonexistent_metric, check: '<= 1'}]\n", "names no layer-table column"),
    "G18": ("dataset:\n  seq_len: 64\n  seq_len: 32\n", "line 3: key 'seq_len' is given twice; keep one"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_is_refused_before_anything_runs(
    case: str, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, said = CONFIGS[case]
    (tmp_path / "c.yaml").write_text(text)
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", str(tmp_path / "c.yaml")]
    assert main(["--store", str(tmp_path / "store"), *args]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("microscope: error: ") and said in err, err
    assert not (tmp_path / "store" / "audits").exists()  # nothing started


def test_g5_g6_an_sae_that_cannot_work_or_fit_is_refused_with_the_numbers() -> None:
    from microscope.errors import InputError
    from microscope.sae.budget import check_fit
    from schemas.config import SAEConfig

    with pytest.raises(InputError, match=r"sae.k=32 is more than the SAE's 8 latents \(d_in 96 × d_sae 8\)"):
        check_fit(SAEConfig(d_sae=8, k=32), 96, 1, 1 << 40)
    with pytest.raises(InputError, match=r"needs about \d+\.\d GiB .* and 4.0 GiB is free; lower sae.expansion"):
        check_fit(SAEConfig(expansion=100_000), 96, 1, 4 << 30)


def test_g7_g8_g17_stage_and_layer_names() -> None:
    from flows.stages import expand_stages
    from microscope.errors import InputError
    from microscope.trace import resolve_layers

    with pytest.raises(ValueError, match="unknown stage"):
        expand_stages(["ingest", "frobnicate"])
    with pytest.raises(InputError, match=r"layer 99 does not exist; the model has 3 layers \(0..2\)"):
        resolve_layers([99], 3)


def test_g8_empty_stage_list_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(tmp_path), "--stages", ","]) == EXIT_INPUT
    assert "--stages ',' names no stage" in capsys.readouterr().err


def test_g19_d12_unreadable_config_and_dataset_get_one_line(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """Root reads anything: the command runs with the powers that bypass permission bits dropped."""
    import shutil

    if shutil.which("capsh") is None:
        pytest.skip("capsh is not installed: permission bits do not apply to root")
    config, data = tmp_path / "noperm.yaml", tmp_path / "noperm.txt"
    config.write_text("dataset: {seq_len: 32}\n")
    shutil.copy(corpus_file, data)
    config.chmod(0)
    data.chmod(0)
    env = {k: v for k, v in cli_env(tmp_path, None).items() if k != "MICROSCOPE_WARM_SOCKET"}
    for extra in (["--dataset", str(corpus_file), "--config", str(config)], ["--dataset", str(data)]):
        cmd = " ".join([str(VENV_BIN / "microscope"), "run", "--model", str(tiny_gpt2_dir), *extra])
        drop = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", cmd]
        p = subprocess.run(drop, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        refused(p, EXIT_INPUT, "permission is denied (", "give this user access to it")


# ---- the command line on a store of records ---------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> str:
    from microscope import audits
    from microscope.store import open_store
    from schemas.records import AuditRecord

    st = open_store(str(tmp_path / "store"))
    for i, aid in enumerate(("20261206-000001-aaaaaa", "20261206-000002-bbbbbb")):
        audits.save(
            st,
            AuditRecord.model_validate(
                {
                    "audit_id": aid,
                    "run_id": "r",
                    "step": i,
                    "created_at": f"2026-12-06T00:00:0{i}Z",
                    "status": "completed",
                    "model": {"source": "m", "source_fingerprint": "0"},
                    "config": {},
                    "store_uri": st.uri,
                }  # fmt: skip
            ),
        )
    return st.uri


A, B = "20261206-000001-aaaaaa", "20261206-000002-bbbbbb"
RULES = "rules: [{metric: metrics.alpha_mean, check: '<= 5'}]\n"

# case: (arguments after `microscope --store STORE`, exit code, what stderr's last line says)
COMMANDS: dict[str, tuple[list[str], int, str]] = {
    "L1": (["show", "does-not-exist"], 2, "no audit 'does-not-exist' in"),
    "L2": (["show", "../../../../etc/passwd"], 2, "invalid artifact key"),
    "L3": (["show", "../audits/x"], 2, "invalid artifact key"),
    "L4": (["show", "/etc/passwd"], 2, "invalid artifact key"),
    "L5": (["show", "a" * 300], 2, "(300 characters) is no audit id; ids have at most 128"),
    "L6": (["run", "--model", "m", "--audit-id", "../../escape"], 2, "audit id"),
    "L7": (["run", "--model", "m", "--audit-id", "team/x1"], 2, "audit id"),
    "L8": (["gate", B, "--rules", "RULES", "--baseline", "nonexistent-id"], 2, "baseline 'nonexistent-id' is no"),
    "L9": (["gate", B, "--rules", "RULES", "--baseline", "tag:"], 2, "names no tag; write tag:KEY"),
    "L10": (["gate", B, "--rules", "RULES", "--baseline", "../../etc/passwd"], 2, "invalid artifact key"),
    "L11": (["gate", B, "--rules", "RULES", "--baseline", "20261206"], 2, "'20261206' matches 2 audits ("),
    "L12": (["gate", B, "--rules", "TYPO"], 2, "'layers.*.spectral_nrom' names no layer-table column"),
    "L13": (["gate", B, "--rules", "/etc/passwd"], 2, "must be a mapping with `rules:`"),
    "L16": (["search", "layers", "--like", ""], 2, "--like '' is not AUDIT:LAYER"),
    "L17": (["search", "layers", "--like", ":::"], 2, "is not AUDIT:LAYER"),
    "L18": (["search", "layers", "--like", f"{A}:x:extra"], 2, "is not AUDIT:LAYER"),
    "L20": (["search", "layers", "--like", "../../x:y"], 2, "invalid artifact key"),
    "L21": (["search", "features", "--like", f"{A}:blocks.2.hook_resid_post:-1"], 2, "feature '-1' is not a number"),
    "L22": (["search", "layers", "--like", f"{A}:w", "-k", "-5"], 2, "argument -k: '-5' is not a whole number"),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_a_bad_command_line_is_refused_in_one_line(
    case: str, store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, code, said = COMMANDS[case]
    (tmp_path / "rules.yaml").write_text(RULES)
    (tmp_path / "typo.yaml").write_text("rules: [{metric: layers.*.spectral_nrom, check: '<= 3'}]\n")
    files = {"RULES": str(tmp_path / "rules.yaml"), "TYPO": str(tmp_path / "typo.yaml")}
    args = [files.get(a, a) for a in args]
    run: Callable[[], int] = lambda: main(["--store", store, *args])  # noqa: E731
    if case == "L22":  # argparse's own refusal: usage, then the line naming the option
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == code
    else:
        assert run() == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and said in err.splitlines()[-1], err
    if case != "L22":
        assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("run_id", ["実験🚀\u202ertl", "\udcff\udcfe"])  # L14, L15 (invalid UTF-8 as argv decodes it)
def test_l14_l15_an_unknown_run_lists_nothing_and_says_so(
    run_id: str, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", store, "list", "--run", run_id]) == 0
    assert "no audits of run" in capsys.readouterr().err


def test_l19_a_layer_missing_from_the_index_is_named(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", store, "search", "layers", "--like", f"{A}:no.such.layer"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in the index; run the audit's metrics/sae stages first" in err
