"""The warm process (flows/preload.py): `microscope run` forked from a process that has imported everything
behaves as the command run cold: the same record, exit codes and error lines, the caller's own environment,
working directory and terminal; Ctrl-C reaches it; what a fork cannot switch (environment read at import,
the Python, the code) makes the warm process refuse, and the command runs cold, saying why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import preload
from tests.conftest import VENV_BIN, cli_env, run_cli

pytestmark = pytest.mark.skipif(not preload.supported(), reason="the warm process forks: Linux only")

CONFIG = "dataset: {seq_len: 32, max_tokens: 1024}\n"


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A warm process of its own (`python -m flows.preload SOCKET`): its socket and its log."""
    root = tmp_path_factory.mktemp("warm")
    sock, log_path = root / "w.sock", root / "warm.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.preload", str(sock)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.2)
    yield sock, log_path
    proc.terminate()
    proc.wait(30)
    log.close()
    assert not sock.exists()  # removed on the way out


def _commands(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("command ") and ": microscope " in ln]


def test_a_warm_run_is_the_cold_run(
    warm: tuple[Path, Path], tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """Cold first, then warm from another working directory with relative paths: the same audit, every stage
    cached, in the caller's workspace (its environment), with the quiet console on the caller's stderr."""
    sock, log = warm
    env = cli_env(tmp_path, prefect_api)
    env.pop("PREFECT_LOGGING_LEVEL")
    (tmp_path / "audit.yaml").write_text(CONFIG)
    args = ["run", "--config", "audit.yaml", "--stages", "ingest,metrics", "--json"]
    cold = run_cli([*args, "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file)], env, tmp_path)
    assert cold.returncode == 0, cold.stderr[-3000:]
    before = len(_commands(log))

    sub = tmp_path / "elsewhere"
    sub.mkdir()
    (sub / "model").symlink_to(tiny_gpt2_dir)
    (sub / "audit.yaml").write_text(CONFIG)
    warm_env = {**env, "MICROSCOPE_WARM_SOCKET": str(sock)}
    hot = run_cli([*args, "--model", "model", "--dataset", str(corpus_file)], warm_env, sub)
    assert hot.returncode == 0, hot.stderr[-3000:]
    ran = _commands(log)[before:]
    assert len(ran) == 1 and f"(in {sub})" in ran[0], log.read_text()[-2000:]
    a, b = json.loads(cold.stdout), json.loads(hot.stdout)
    assert b["audit_id"] != a["audit_id"] and b["model_digest"] == a["model_digest"]
    assert b["store_uri"] == a["store_uri"] == str(tmp_path / "home" / "artifacts")  # the caller's MICROSCOPE_HOME
    assert b["stages"]["ingest"]["status"] == b["stages"]["metrics"]["status"] == "cached"
    assert b["stages"]["metrics"]["details"]["weights"] == a["stages"]["metrics"]["details"]["weights"]
    assert "ingest: started" in hot.stderr and "metrics: cached" in hot.stderr and "Task run" not in hot.stderr
    assert hot.stdout.lstrip().startswith("{")  # stdout carries only the record, as cold


def test_input_errors_exit_2_with_one_line(
    warm: tuple[Path, Path], tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path
) -> None:
    sock, log = warm
    env = {**cli_env(tmp_path, prefect_api), "MICROSCOPE_WARM_SOCKET": str(sock)}
    before = len(_commands(log))
    p = run_cli(["run", "--model", str(tiny_gpt2_dir), "--dataset", "none.txt"], env, tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("microscope: error: ") and "does not exist" in p.stderr
    assert len(_commands(log)) == before + 1 and "exited 2" in log.read_text().splitlines()[-1]


def test_ctrl_c_reaches_the_command(
    warm: tuple[Path, Path], tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """SIGINT to the caller is forwarded: the command ends as a cold one does on Ctrl-C (exit 130)."""
    sock, _ = warm
    env = {**cli_env(tmp_path, prefect_api), "MICROSCOPE_WARM_SOCKET": str(sock)}
    env.pop("PREFECT_LOGGING_LEVEL")  # the stage lines are INFO
    (tmp_path / "audit.yaml").write_text(
        CONFIG + "sae: {hooks: [blocks.1.hook_resid_post], batch_size: 64, buffer_tokens: 512, epochs: 5000}\n"
    )
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
    proc = subprocess.Popen(
        [str(VENV_BIN / "microscope"), *args, "--stages", "sae"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "sae[" in line and "started" in line:
            break
    else:
        raise AssertionError("the SAE stage never started")
    time.sleep(3)  # into the fit (a signal while Lightning sets up can go unnoticed, cold or warm)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(120) == 130, rest[-2000:]
    assert "microscope: error: interrupted; finished stages are kept" in rest


def test_what_a_fork_cannot_switch_runs_cold(
    warm: tuple[Path, Path], tmp_path: Path, prefect_api: str, tiny_gpt2_dir: Path
) -> None:
    """An environment variable read at import (HF_HUB_OFFLINE) that differs: refused, run here, said once."""
    sock, log = warm
    env = {**cli_env(tmp_path, prefect_api), "MICROSCOPE_WARM_SOCKET": str(sock), "HF_HUB_OFFLINE": "0"}
    before = len(_commands(log))
    p = run_cli(["run", "--model", str(tiny_gpt2_dir), "--dataset", "none.txt"], env, tmp_path)
    assert p.returncode == 2
    assert "the warm process was not used (HF_HUB_OFFLINE differs from its environment); running here" in p.stderr
    assert len(_commands(log)) == before and "refused a command: HF_HUB_OFFLINE" in log.read_text()


def test_refusals_name_what_differs() -> None:
    me = {"python": sys.executable, "code": "1:2", "env": {"HF_HOME": "/a"}}
    assert preload._mismatch(me, dict(me)) == ""
    assert "source changed" in preload._mismatch(me, {**me, "code": "3:2"})
    assert "runs " + sys.executable in preload._mismatch(me, {**me, "python": "/other/python in /other"})
    assert preload._mismatch(me, {**me, "env": {}}) == "HF_HOME differs from its environment"
    assert preload.socket_path(Path("/" + "x" * 120)).parent.name.startswith("microscope-")  # short enough to bind
