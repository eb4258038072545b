"""The viewer's (dashboard/app.py) page timings on a store of finished audits, against its targets:
a page in < 5 s cold and < 2 s warm, a layer / step / feature switch in < 300 ms, Evolution's playback at
>= 4 steps/s over a 50-checkpoint run.

    python benchmarks/viewer.py [--store URI] [--reps 3] [--json build/benchmarks/viewer.json] [--no-browser]

Server side, through `streamlit.testing.v1.AppTest` (it executes the script the server runs, so these are
render times on the server, without the websocket and the browser):
- cold: a fresh Python process (streamlit imported, nothing else): the first session's run of app.py plus
  the switch to the page (so the default page, Audits, is rendered first and counted);
  the viewer's warm-up (dashboard/prewarm.py) starts after that first run and competes with the switch, as
  when a user opens the page at once;
- first open after the warm-up: another fresh process; the first run, then the warm-up's imports (timed),
  then the switch to the page (timed): a user who read the first page for a few seconds;
- warm: a new session in the same process (caches filled, the warm-up ended): app.py + the page, median of
  --reps;
- switch: the rerun after choosing another matrix on Layers, step on Evolution, feature on SAE features;
- playback: Evolution on a synthetic run "bench-run" of 50 checkpoints (one real record of the store copied
  50 times, steps 0..49, into a temporary store whose audits/ holds the copies and whose artifacts are
  links to the store's), a step change per rerun from step 0 to 49. AppTest reruns the whole page; the
  browser reruns only the panels' fragment, so this is an upper bound.
In a real browser (headless Chromium over the DevTools protocol, when one is on PATH): `streamlit run`
start-up to healthy, each page's first and second load (navigation to rendered: a heading, the script
stopped, the DOM steady), and ▶ Play on the synthetic run (steps reached per second at 4 steps/s).

A benchmark, not a test: no assertion on time. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
PAGES = sorted(p.stem for p in (REPO / "dashboard" / "views").glob("*.py") if not p.name.startswith("_"))
BENCH_RUN, BENCH_STEPS = "bench-run", 50
TARGETS = {"cold_s": 5.0, "warm_s": 2.0, "switch_ms": 300.0, "steps_per_s": 4.0}
# (page, widget kind, key, query parameter): the switches the viewer must answer within 300 ms
SWITCHES = {
    "layers": ("selectbox", "_microscope_pick.layer"),
    "evolution": ("select_slider", "_microscope_pick.step"),
    "sae": ("number_input", "_microscope_pick.feature"),
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- server side: AppTest -----------------------------------------------------------------------


def session(store: str, page: str, **params: str):
    """A new AppTest session on `page`; (the session, seconds from its start to the page rendered)."""
    from streamlit.testing.v1 import AppTest

    t = time.perf_counter()
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"store": store, **params})
    at.run()  # app.py + the default page: st.navigation registers the pages
    if page != "audits":
        at.switch_page(f"views/{page}.py").run()
    elapsed = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
    return at, elapsed


def _warmed_up() -> None:
    from dashboard.prewarm import WARM_UP
    from microscope.settings import get_settings

    if get_settings().viewer_prewarm and not WARM_UP.done.wait(60):
        raise RuntimeError("the viewer's warm-up did not finish within 60 s")


def after_warm_up(store: str, page: str, **params: str) -> dict[str, float]:
    """As a user meets the viewer: the first page (Audits) renders, the viewer's warm-up (dashboard/prewarm.py)
    imports the model libraries while the user reads it, then `page` opens for the first time. Seconds of the
    warm-up after the first page, and of that first open."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"store": store, **params})
    at.run()
    t = time.perf_counter()
    _warmed_up()
    warm_up = time.perf_counter() - t
    t = time.perf_counter()
    if page != "audits":
        at.switch_page(f"views/{page}.py").run()
    first = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
    return {"warm_up_s": warm_up, "after_warm_up_s": first}


def switch_times(at, page: str, limit: int) -> list[float]:
    """Seconds per rerun after each of `limit` choices on the page's picker, cycling through its options
    (the first visit of an option fills its caches; later ones are warm)."""
    kind, key = SWITCHES[page]
    widget = getattr(at, kind)(key=key)
    if kind == "number_input":
        options = list(range(min(int(widget.max or 0) + 1, limit)))
    else:
        options = list(widget.options)[:limit]
    if len(options) < 2:
        return []
    out = []
    current = str(widget.value)
    for i in range(limit):
        value = options[i % len(options)]
        if str(value) == current:
            value = options[(i + 1) % len(options)]
        current = str(value)
        widget = getattr(at, kind)(key=key)
        widget.select(value) if kind == "selectbox" else widget.set_value(int(value))
        t = time.perf_counter()
        at.run()
        out.append(time.perf_counter() - t)
        if at.exception:
            raise RuntimeError(f"{page} switch to {value}: {[e.value for e in at.exception]}")
    return out


def child(page: str, store: str, reps: int, params: dict[str, str], warm_up: bool = False) -> dict[str, Any]:
    """One page in this (fresh) process, on the URL's query `params`: cold, warm, and its switches; with
    `warm_up`, its first open after the viewer's warm-up instead."""
    import streamlit  # noqa: F401 -- imported before the clock: a server has it loaded

    if warm_up:
        sys.path.insert(0, str(REPO))
        return {"page": page, **after_warm_up(store, page, **params)}
    _, cold = session(store, page, **params)
    _warmed_up()  # a second visit: the warm-up that started after the first page has ended
    warm = []
    at = None
    for _ in range(reps):
        at, t = session(store, page, **params)
        warm.append(t)
    out: dict[str, Any] = {"page": page, "cold_s": cold, "warm_s": statistics.median(warm)}
    if page in SWITCHES and at is not None:
        try:
            sw = switch_times(at, page, limit=8)
        except (KeyError, ValueError) as e:  # the widget is not on the page (nothing to switch to here)
            out["switch_error"] = str(e)
        else:
            if sw:
                out["switch_ms_p50"], out["switch_ms_max"], out["switches"] = (
                    pct(sw, 0.5) * 1e3,
                    max(sw) * 1e3,
                    len(sw),
                )
    return out


def playback_apptest(store: str) -> dict[str, Any]:
    """Evolution on the synthetic run: the rerun after each step change 0 → 49 (a full page rerun)."""
    at, _ = session(store, "evolution", run=BENCH_RUN, step="0")
    _warmed_up()  # a user pressing play has had the viewer open a while
    times = []
    for step in range(1, BENCH_STEPS):
        at.select_slider(key="_microscope_pick.step").set_value(step)
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
        if at.exception or at.query_params.get("step") != str(step):
            raise RuntimeError(f"step {step}: {[e.value for e in at.exception]} {at.query_params}")
    return {
        "rerun_ms_p50": pct(times, 0.5) * 1e3,
        "rerun_ms_p95": pct(times, 0.95) * 1e3,
        "steps_per_s": 1 / pct(times, 0.5),
    }


def fullest(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest of the completed records with the most completed stages (the one that shows most)."""

    def stages(r: dict[str, Any]) -> int:
        return sum(
            1 for s in (r.get("stages") or {}).values() if isinstance(s, dict) and s.get("status") == "completed"
        )

    return max(records, key=lambda r: (r.get("status") == "completed", stages(r), r.get("created_at", "")))


def synthetic_run(store: str, into: Path) -> str:
    """A local store at `into`: the store's entries linked, its audits/ copied, plus 50 copies of its
    latest completed record as run BENCH_RUN, steps 0..49 (distinct ids; nothing else changed)."""
    src = Path(store.removeprefix("file://"))
    if not (src / "audits").is_dir():
        raise SystemExit(f"the playback needs a local store with audits/: {store}")
    for entry in src.iterdir():
        if entry.name != "audits":
            (into / entry.name).symlink_to(entry.resolve())
    shutil.copytree(src / "audits", into / "audits")
    base = fullest([json.loads(p.read_text()) for p in sorted((src / "audits").glob("*.json"))])
    for step in range(BENCH_STEPS):
        audit_id = f"bench-{step:04d}-{base['audit_id']}"
        rec = dict(base, audit_id=audit_id, run_id=BENCH_RUN, step=step)
        (into / "audits" / f"{audit_id}.json").write_text(json.dumps(rec))
    return str(into)


# ---- a real browser ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@contextlib.contextmanager
def server(store: str) -> Iterator[tuple[str, float]]:
    """`streamlit run dashboard/app.py` on `store`; (its URL, seconds from start to /_stcore/health)."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    env = {**os.environ, "MICROSCOPE_STORE": store}
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None or time.perf_counter() - t > 120:
                raise RuntimeError(f"streamlit did not become healthy (exit {proc.returncode})")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
                break
            time.sleep(0.02)
        yield base, time.perf_counter() - t
    finally:
        stop_group(proc)


STATE_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const status = document.querySelector('[data-testid="stStatusWidget"]');
  const caption = [...(main ? main.querySelectorAll('[data-testid="stCaptionContainer"]') : [])]
    .map(c => c.innerText).find(t => t.includes(' is audit ')) || '';
  return JSON.stringify({
    text: main ? main.innerText.length : 0, html: main ? main.innerHTML.length : 0,
    headings: main ? main.querySelectorAll('h1, h2').length : 0,
    running: !!status && status.innerText.includes('Running'),
    stale: document.querySelectorAll('[data-stale="true"]').length, caption: caption,
  });
})()"""


class Chromium:
    """Headless Chromium with one tab, over the DevTools protocol (the same driving as the browser test)."""

    def __init__(self, binary: str, profile: Path) -> None:
        cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
        cmd += ["--window-size=1400,1800", "--disable-dev-shm-usage", "--remote-debugging-port=0"]
        cmd += [f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._id = 0
        try:
            active, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
            while not (active.exists() and active.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.1)
            port = int(active.read_text().split()[0])
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            from websockets.sync.client import connect

            self.ws = connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        except BaseException:
            stop_group(self.proc)
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, js: str) -> Any:
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def load(self, url: str, timeout: float = 120) -> float:
        """Seconds from navigating to `url` to the page rendered (heading shown, script stopped, nothing
        stale; confirmed by a steady DOM 0.3 s later, which is not counted)."""
        self.call("Page.navigate", url="about:blank")  # so that the old page cannot pass for the new one
        for _ in range(500):
            if self.eval("location.href") == "about:blank":
                break
            time.sleep(0.02)
        t = time.perf_counter()
        self.call("Page.navigate", url=url)
        done_at, last = None, None
        while time.perf_counter() - t < timeout:
            s = json.loads(self.eval(STATE_JS))
            key = (s["text"], s["html"])
            if s["headings"] and not s["running"] and not s["stale"]:
                if done_at is None or key != last:
                    done_at = time.perf_counter()
                elif time.perf_counter() - done_at >= 0.3:
                    return done_at - t
            else:
                done_at = None
            last = key
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not render within {timeout}s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_group(self.proc)


def browser(binary: str, store: str, bench_store: str, params: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    query = urllib.parse.urlencode(params)
    with tempfile.TemporaryDirectory() as tmp, server(store) as (base, startup):
        out["startup_to_healthy_s"] = startup
        b = Chromium(binary, Path(tmp) / "profile")
        try:
            out["root_first_load_s"] = b.load(f"{base}/?{query}")  # app.py first (see test_browser's xfail)
            out["pages"] = {}
            for p in PAGES:
                first = b.load(f"{base}/{p}?{query}")
                out["pages"][p] = {"first_s": first, "second_s": b.load(f"{base}/{p}?{query}")}
        finally:
            b.close()
    with tempfile.TemporaryDirectory() as tmp, server(bench_store) as (base, _):
        b = Chromium(binary, Path(tmp) / "profile")
        try:
            b.load(f"{base}/")
            b.load(f"{base}/evolution?run={BENCH_RUN}&step=0")
            deadline, clicked = time.monotonic() + 15, False
            while not clicked and time.monotonic() < deadline:
                clicked = b.eval("""(() => { const p = [...document.querySelectorAll('button')]
                    .find(e => e.innerText.includes('Play')); if (p) p.click(); return !!p; })()""")
                time.sleep(0.2)
            if not clicked:
                return out | {"playback": "no ▶ Play button on Evolution"}
            seen: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 60 and (not seen or seen[-1][1] < BENCH_STEPS - 1):
                caption = json.loads(b.eval(STATE_JS))["caption"]
                step = int(caption.split("step ")[-1].split(" is audit")[0]) if " is audit " in caption else None
                if step is not None and (not seen or step != seen[-1][1]):
                    seen.append((time.perf_counter(), step))
                time.sleep(0.02)
        finally:
            b.close()
    ticks = [t1 - t0 for (t0, _), (t1, _) in zip(seen, seen[1:], strict=False)]
    moved = seen[-1][1] - seen[0][1] if seen else 0
    out["playback"] = {
        "requested_steps_per_s": 4,
        "steps_seen": moved,
        "steps_per_s": moved / (seen[-1][0] - seen[0][0]) if moved else 0.0,
        "tick_ms_p50": pct(ticks, 0.5) * 1e3 if ticks else None,
        "tick_ms_p95": pct(ticks, 0.95) * 1e3 if ticks else None,
    }
    return out


# ---- report -----------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    rows = [("measure", "value", "target", "ratio", "ok")]

    def add(what: str, value: float | None, target: float, unit: str, higher_is_better: bool = False) -> None:
        if value is None:
            return
        ratio = value / target
        ok = ratio >= 1 if higher_is_better else ratio <= 1
        rows.append(
            (
                what,
                f"{value:.3g} {unit}",
                f"{'>=' if higher_is_better else '<'} {target:g} {unit}",
                f"{ratio:.2f}",
                "yes" if ok else "NO",
            )
        )

    for p in report["apptest"]["pages"]:
        add(f"{p['page']}: cold", p["cold_s"], TARGETS["cold_s"], "s")
        if p["page"] != "audits":  # the first page itself
            add(f"{p['page']}: first open after the warm-up", p.get("after_warm_up_s"), TARGETS["cold_s"], "s")
        add(f"{p['page']}: warm", p["warm_s"], TARGETS["warm_s"], "s")
        add(f"{p['page']}: switch p50", p.get("switch_ms_p50"), TARGETS["switch_ms"], "ms")
    pb = report["apptest"].get("playback")
    if pb:
        add("evolution 50 steps: rerun p50", pb["rerun_ms_p50"], 1e3 / TARGETS["steps_per_s"], "ms")
        add("evolution 50 steps: rerun p95", pb["rerun_ms_p95"], 1e3 / TARGETS["steps_per_s"], "ms")
        add("evolution 50 steps: steps/s (p50)", pb["steps_per_s"], TARGETS["steps_per_s"], "/s", True)
    br = report.get("browser") or {}
    if "startup_to_healthy_s" in br:
        rows.append(("browser: streamlit start-up to healthy", f"{br['startup_to_healthy_s']:.3g} s", "", "", ""))
        for p, t in br.get("pages", {}).items():
            add(f"browser {p}: first load", t["first_s"], TARGETS["cold_s"], "s")
            add(f"browser {p}: second load", t["second_s"], TARGETS["warm_s"], "s")
        if isinstance(br.get("playback"), dict):
            add("browser ▶ Play: steps/s", br["playback"]["steps_per_s"], TARGETS["steps_per_s"], "/s", True)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="a store of finished audits (default: the settings' store, as `make demo` fills)")
    ap.add_argument("--reps", type=int, default=3, help="warm sessions per page (the median is reported)")
    ap.add_argument("--json", type=Path, default=REPO / "build" / "benchmarks" / "viewer.json")
    ap.add_argument("--no-browser", action="store_true", help="AppTest only (no Chromium)")
    ap.add_argument("--pages", nargs="+", choices=PAGES, default=PAGES, help="the pages to time (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one page in a fresh process (internal)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)  # the URL's query (internal)
    ap.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)  # after the warm-up (internal)
    a = ap.parse_args()
    if a.store is None:
        sys.path.insert(0, str(REPO))
        from microscope.settings import get_settings

        a.store = get_settings().store_uri
    if a.child:
        print(json.dumps(child(a.child, a.store, a.reps, json.loads(a.params), a.warm_up)))
        return
    records = [json.loads(p.read_text()) for p in Path(a.store.removeprefix("file://")).glob("audits/*.json")]
    if not records:
        raise SystemExit(f"no audit in {a.store}: run `make demo` or pass --store")
    steps: dict[str, set[int]] = {}
    for r in records:
        if r.get("run_id") and r.get("step") is not None:
            steps.setdefault(r["run_id"], set()).add(r["step"])
    run = max(steps, key=lambda k: len(steps[k]), default=None)  # the run with most steps: a step to switch
    params = {"audit": fullest(records)["audit_id"], **({"run": run} if run else {})}
    pages = []
    for page in a.pages:  # each page in a fresh process: cold means nothing imported, every cache empty
        cmd = [sys.executable, __file__, "--child", page, "--store", a.store, "--reps", str(a.reps)]
        p = subprocess.run(
            [*cmd, "--params", json.dumps(params)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if p.returncode:
            pages.append({"page": page, "error": p.stderr.strip().splitlines()[-1:]})
            continue
        pages.append(json.loads(p.stdout.strip().splitlines()[-1]))
        # a fresh process again: the page's first open once the warm-up has run after the first page
        w = subprocess.run(
            [*cmd, "--params", json.dumps(params), "--warm-up"], cwd=REPO, capture_output=True, text=True
        )
        if w.returncode == 0:
            pages[-1] |= json.loads(w.stdout.strip().splitlines()[-1])
        else:
            pages[-1]["warm_up_error"] = w.stderr.strip().splitlines()[-1:]
        print(f"{page}: done", file=sys.stderr)
    report: dict[str, Any] = {
        "store": a.store,
        "audits": len(records),
        "query": params,
        "note": "apptest = streamlit.testing.v1.AppTest: the script the server runs, timed on the server side",
        "targets": TARGETS,
        "apptest": {"pages": [p for p in pages if "error" not in p], "errors": [p for p in pages if "error" in p]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        bench_store = synthetic_run(a.store, Path(tmp))
        sys.path.insert(0, str(REPO))
        report["apptest"]["playback"] = playback_apptest(bench_store)
        binary = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
        if not a.no_browser and binary:
            report["browser"] = browser(binary, a.store, bench_store, params)
        elif not a.no_browser:
            report["browser"] = {"skipped": "no chromium on PATH"}
    print(report["note"] + ".")
    print(table(report))
    for e in report["apptest"]["errors"]:
        print(f"{e['page']}: failed: {e['error']}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=2, default=float))
    print(f"JSON: {a.json}")


if __name__ == "__main__":
    main()
