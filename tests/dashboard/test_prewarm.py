"""The viewer's warm-up (`dashboard.prewarm`): it imports its steps in the background once, never while a page
runs or has just run and never letting a page run while it imports (a page that waits goes before the next
step), and a failing step ends it quietly. Steps are modules
written here that record when their import starts and ends and take 0.3 s."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from dashboard.prewarm import WarmUp

EVENTS: list[tuple[str, str, float]] = []  # (what, "start" | "end", monotonic time), from the modules too


def _write_steps(root: Path, names: list[str], body: str = "time.sleep(0.3)") -> tuple[str, ...]:
    for name in names:
        (root / f"{name}.py").write_text(
            "import time\nfrom tests.dashboard.test_prewarm import EVENTS\n"
            f"EVENTS.append(({name!r}, 'start', time.monotonic()))\n{body}\n"
            f"EVENTS.append(({name!r}, 'end', time.monotonic()))\n"
        )
    return tuple(names)


@pytest.fixture
def steps(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, ...]:
    tag = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    names = [f"warm_{tag}_{i}" for i in range(3)]
    sys.path.insert(0, str(tmp_path))
    EVENTS.clear()
    yield _write_steps(tmp_path, names)
    sys.path.remove(str(tmp_path))
    for n in names:
        sys.modules.pop(n, None)


def _intervals(what: str) -> list[tuple[float, float]]:
    starts = [t for w, e, t in EVENTS if w == what and e == "start"]
    ends = [t for w, e, t in EVENTS if w == what and e == "end"]
    return list(zip(starts, ends, strict=True))


def test_the_steps_are_imported_once_in_order(steps: tuple[str, ...]) -> None:
    w = WarmUp(steps, idle_s=0)
    w.start()
    w.start()  # a second page's run: nothing more
    assert w.done.wait(30)
    assert w.imported == list(steps) and all(s in sys.modules for s in steps)
    assert [w_ for w_, e, _ in EVENTS if e == "start"] == list(steps)


def test_no_step_imports_while_a_page_runs_and_no_page_starts_during_a_step(steps: tuple[str, ...]) -> None:
    w = WarmUp(steps, idle_s=0)
    page_times: list[tuple[float, float]] = []

    def page(hold: float) -> None:
        with w.page_run():
            t0 = time.monotonic()
            EVENTS.append(("page", "start", t0))
            time.sleep(hold)
            EVENTS.append(("page", "end", time.monotonic()))
            page_times.append((t0, time.monotonic()))

    first = threading.Thread(target=page, args=(0.5,))
    first.start()
    time.sleep(0.05)  # the first page runs when the warm-up starts: its first step must wait for the page
    w.start()
    time.sleep(0.7)  # the first step is importing now (0.3 s): a page started here must wait for it
    second = threading.Thread(target=page, args=(0.2,))
    second.start()
    first.join(10)
    second.join(10)
    assert w.done.wait(30)
    steps_run = [iv for s in steps for iv in _intervals(s)]
    assert len(steps_run) == 3 and len(page_times) == 2
    for s0, s1 in steps_run:  # closed intervals never overlap
        for p0, p1 in page_times:
            assert s1 <= p0 or p1 <= s0, ((s0, s1), (p0, p1))
    assert steps_run[0][0] >= page_times[0][1]  # the first step began after the first page ended
    # the second page came during the first step: it ran as soon as that step ended, before the next one
    assert steps_run[0][1] <= page_times[1][0] and page_times[1][1] <= steps_run[1][0]


def test_steps_wait_until_no_page_has_run_for_the_idle_time(steps: tuple[str, ...]) -> None:
    """Pages clicked through in quick succession are never held back: the first step starts only once the
    viewer has been idle for `idle_s` after the last page."""
    w = WarmUp(steps, idle_s=0.6)
    ends = []
    for _ in range(3):  # three pages 0.2 s apart: each resets the idle clock
        with w.page_run():
            time.sleep(0.1)
        ends.append(time.monotonic())
        w.start()
        time.sleep(0.2)
    assert w.done.wait(30)
    first_step = _intervals(steps[0])[0][0]
    assert first_step >= ends[-1] + 0.6 - 0.01  # the page's own end is taken just before `ends` records it


def test_a_failing_step_ends_the_warm_up_quietly(tmp_path: Path) -> None:
    sys.path.insert(0, str(tmp_path))
    try:
        names = _write_steps(tmp_path, ["warm_fail_ok", "warm_fail_bad", "warm_fail_never"])
        (tmp_path / "warm_fail_bad.py").write_text("raise ImportError('no such library here')\n")
        w = WarmUp(names, idle_s=0)
        w.start()
        assert w.done.wait(30)
        assert w.imported == ["warm_fail_ok"] and "warm_fail_never" not in sys.modules
        with w.page_run():  # pages still run
            pass
    finally:
        sys.path.remove(str(tmp_path))
        for n in ("warm_fail_ok", "warm_fail_bad", "warm_fail_never"):
            sys.modules.pop(n, None)
