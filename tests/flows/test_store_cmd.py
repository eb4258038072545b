"""`microscope gc` and `microscope delete` in-process (`flows.cli.main`), on a copy of the session's finished
audits: a dry run prints the plan and deletes nothing, --yes deletes and prints the bytes freed (checked
exactly against os.walk sizes), a refusal exits 2 with one line."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from flows.cli import main


def walk_total(root: Path) -> int:
    return sum(Path(d, n).stat().st_size for d, _, names in os.walk(root) for n in names)


@pytest.fixture
def copy(tmp_path: Path, home: Path, finished_audits: dict[str, dict]) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(finished_audits["step1"]["store_uri"], dst)
    return dst


def freed(out: str) -> int:
    m = re.search(r"deleted: .* freed \(([\d,]+) bytes\)", out)
    assert m, out
    return int(m.group(1).replace(",", ""))


def test_gc_dry_run_then_yes(copy: Path, finished_audits: dict[str, dict], capsys: pytest.CaptureFixture) -> None:
    orphan = copy / finished_audits["step1"]["model_digest"][:16] / "trace" / "feedfacefeedface" / "part.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"\0" * 3 * 2**20)  # 3 MiB
    before = walk_total(copy)

    assert main(["gc", "--store", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"prefix   {orphan.parent.relative_to(copy).as_posix()}  (3 MiB)" in out
    assert "run again with --yes to delete" in out and orphan.exists()
    assert walk_total(copy) == before

    assert main(["--store", str(copy), "gc", "--yes"]) == 0
    out = capsys.readouterr().out
    assert not orphan.exists()
    assert freed(out) == before - walk_total(copy) >= 3 * 2**20

    assert main(["gc", "--store", str(copy)]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_delete_audit(copy: Path, finished_audits: dict[str, dict], capsys: pytest.CaptureFixture) -> None:
    audit = finished_audits["partial"]["audit_id"]
    assert main(["delete", audit, "--store", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"record   audits/{audit}.json" in out and "run again with --yes" in out
    assert (copy / "audits" / f"{audit}.json").exists()
    before = walk_total(copy)
    assert main(["delete", audit, "--yes", "--store", str(copy)]) == 0
    assert freed(capsys.readouterr().out) == before - walk_total(copy) > 0
    assert not (copy / "audits" / f"{audit}.json").exists()


def test_refusal_exits_2_with_one_line(
    copy: Path, finished_audits: dict[str, dict], capsys: pytest.CaptureFixture
) -> None:
    before = walk_total(copy)
    assert main(["delete", "--model", finished_audits["step1"]["model_digest"], "--yes", "--store", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.fullmatch(
        r"microscope: error: cannot delete model [0-9a-f]{16}: audit \S+ references its artifacts.*microscope delete \S+.*",
        err,
    )
    assert walk_total(copy) == before
    assert main(["delete", "no-such-audit", "--store", str(copy)]) == 2
    assert capsys.readouterr().err.strip().startswith("microscope: error: no audit 'no-such-audit' in")
