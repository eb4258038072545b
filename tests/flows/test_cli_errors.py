"""Bad input through the command line: a non-zero exit and one clear line on stderr, nothing lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, run_cli
from tests.microscope.test_checkpoint import Evil


@pytest.fixture
def env(tmp_path: Path, prefect_api: str) -> dict[str, str]:
    return cli_env(tmp_path, prefect_api)


def error_line(proc) -> str:
    """The last stderr line: the one the user reads."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("microscope: error: "), proc.stderr[-2000:]
    return lines[-1]


def test_missing_model_path(env, tmp_path: Path, corpus_file: Path) -> None:
    p = run_cli(["run", "--model", str(tmp_path / "nope"), "--dataset", str(corpus_file)], env, tmp_path)
    assert p.returncode == 2
    assert "model path" in error_line(p) and "does not exist" in error_line(p)
    assert len(p.stderr.strip().splitlines()) == 1  # failed before anything started


def test_missing_dataset(env, tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    p = run_cli(["run", "--model", str(tiny_gpt2_dir), "--dataset", str(tmp_path / "none.txt")], env, tmp_path)
    assert p.returncode == 2 and "dataset" in error_line(p) and "does not exist" in error_line(p)


def test_truncated_safetensors(env, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2_dir, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    p = run_cli(["run", "--model", str(broken), "--dataset", str(corpus_file)], env, tmp_path)
    assert p.returncode == 2 and "truncated or corrupt" in error_line(p)
    assert len(p.stderr.strip().splitlines()) == 1


def test_malicious_pickle_never_runs(env, tmp_path: Path, corpus_file: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": Evil(marker)}, tmp_path / "evil.pt")
    (tmp_path / "c.yaml").write_text("model:\n  module: tests.toy_models:ToyLM\n")
    p = run_cli(
        [
            "run",
            "--model",
            str(tmp_path / "evil.pt"),
            "--dataset",
            str(corpus_file),
            "--config",
            str(tmp_path / "c.yaml"),
        ],
        env,
        tmp_path,
    )
    assert p.returncode == 2 and "refusing to load" in error_line(p)
    assert not marker.exists()


def test_unknown_config_key(env, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    (tmp_path / "c.yaml").write_text("trace:\n  layer: [0]\n")
    p = run_cli(
        ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", str(tmp_path / "c.yaml")],
        env,
        tmp_path,
    )
    assert p.returncode == 2
    line = error_line(p)
    assert "unknown key 'trace.layer'" in line and "layers" in line


def test_bad_gate_rules_refused_before_anything_runs(
    env, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    # (a rule that does not parse is refused by the same call: tests/microscope/test_gates.py)
    gate, said = "{rules: nosuch.yaml}", "gate rules nosuch.yaml not found"
    (tmp_path / "c.yaml").write_text(f"gate: {gate}\n")
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", str(tmp_path / "c.yaml")]
    p = run_cli(args, env, tmp_path)
    assert p.returncode == 2 and said in error_line(p)
    assert len(p.stderr.strip().splitlines()) == 1  # refused before the audit started


def test_unknown_stage(env, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    p = run_cli(
        ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--stages", "trace,sea"], env, tmp_path
    )
    assert p.returncode == 2 and "unknown stage(s) sea" in error_line(p)


def test_no_stage_and_climbing_audit_ids_are_refused_before_anything_runs(
    env, tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """Issue 21 #11: `--stages ,` ran every stage; an audit id with '/' or '..' was refused only after the
    pipeline ran."""
    base = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file)]
    p = run_cli([*base, "--stages", ","], env, tmp_path)
    assert p.returncode == 2 and "--stages ',' names no stage" in error_line(p)
    assert len(p.stderr.strip().splitlines()) == 1
    for bad in ("../../escape", "a/b", "x" * 200):
        p = run_cli([*base, "--audit-id", bad], env, tmp_path)
        assert p.returncode == 2 and "is not allowed: use letters, digits" in error_line(p), bad
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "artifacts" / "audits").exists()  # nothing ran


def test_empty_dataset_fails_validation_and_keeps_the_record(env, tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    p = run_cli(["run", "--model", str(tiny_gpt2_dir), "--dataset", str(empty), "--json"], env, tmp_path)
    assert p.returncode == 2
    assert "is empty" in error_line(p) and "at least one document" in error_line(p)
    import json

    record = json.loads(p.stdout)  # the audit record is still written and printed
    assert record["stages"]["ingest"]["status"] == "failed"
    assert record["stages"]["trace"]["status"] == "skipped"
    listed = run_cli(["list", "--json"], env, tmp_path)
    assert [r["audit_id"] for r in json.loads(listed.stdout)] == [record["audit_id"]]


def test_stage_deployments_not_registered(
    tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """`execution: deployments` against a server where `make deploy` never ran: one line that says so."""
    env = cli_env(tmp_path, prefect_api, MICROSCOPE_EXECUTION="deployments", MICROSCOPE_STAGE_FLOW="unregistered")
    p = run_cli(
        ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--stages", "ingest"], env, tmp_path
    )
    assert p.returncode == 2
    line = error_line(p)
    assert "stage deployment unregistered/ingest is not registered" in line and "make deploy" in line
