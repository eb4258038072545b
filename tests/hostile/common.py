"""What every hostile case asserts: the documented exit code, one line that names the problem, no traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

from tests.conftest import run_cli

EXIT_INPUT, EXIT_FAILED = 2, 1


def refused(p: subprocess.CompletedProcess, code: int, *said: str) -> str:
    """The command failed with `code`, its last stderr line is our error naming `said`, and no traceback."""
    err = p.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    assert p.returncode == code, f"exit {p.returncode}, expected {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith("microscope: error: "), f"last stderr line is not the error: {err[-2000:]}"
    for s in said:
        assert s in last, f"{s!r} not in {last!r}"
    return last


def microscope(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, env, cwd, timeout=300)


def rewrite_header(src: Path, dest: Path, edit) -> None:
    """A copy of a safetensors file whose JSON header `edit` changed (the data bytes stay as they were)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dest.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def copy_folder(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
