"""The battery's recount: run the test behind every one of the 123 cases (`cases.CASES`) and tally them.

    .venv/bin/python -m tests.hostile.recount [-n WORKERS]

A case counts as *clear* when its test passes: each test asserts the behaviour the battery asked for (exit 2
or the right HTTP status, one line naming the problem and the fix, no traceback, nothing lost). A case whose
test fails or errors is listed with its test, as *not holding*."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tests.hostile.cases import CASES, EXPECTED

REPO = Path(__file__).resolve().parents[2]


def _outcomes(junit: Path) -> dict[str, str]:
    """pytest node id → passed / failed / error / skipped, from its JUnit XML."""
    out: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        node = f"{path}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[node] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed").replace(
            "failure", "failed"
        )
    return out


def _outcome(outcomes: dict[str, str], node: str) -> str:
    """A node's outcome; a test mapped whole that is parametrised passes when every parameter passes."""
    if node in outcomes:
        return outcomes[node]
    parts = [v for k, v in outcomes.items() if k.startswith(node + "[")]
    if not parts:
        return "not run"
    return "passed" if all(v == "passed" for v in parts) else next(v for v in parts if v != "passed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--workers", default="2", help="pytest-xdist workers (default 2)")
    args = ap.parse_args(argv)
    nodes = sorted(set(CASES.values()))
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", args.workers]
        subprocess.run([*cmd, "-o", "junit_family=xunit1", f"--junitxml={junit}", *nodes], cwd=REPO, check=False)
        outcomes = _outcomes(junit)
    verdicts = {case: _outcome(outcomes, CASES[case]) for case in EXPECTED}
    tally = Counter("clear" if v == "passed" else "not holding" for v in verdicts.values())
    print(f"\n{len(EXPECTED)} cases: {tally['clear']} clear, {tally['not holding']} not holding")
    for case, v in verdicts.items():
        if v != "passed":
            print(f"  {case}: {v} ({CASES[case]})")
    return 0 if tally["not holding"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
