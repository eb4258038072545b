"""The viewer in a real browser: `streamlit run dashboard/app.py` on the finished audits of a tiny GPT-2,
every page (one per file in dashboard/views/) opened in headless Chromium and screenshotted once it has
rendered. Streamlit renders client-side over a websocket, so a plain `chromium --screenshot` can catch the
skeleton: the test drives Chromium through the DevTools protocol instead, waits until the page's main
area shows what it must (the audit id, the run, the page header) and the script has stopped running,
then captures the viewport.

The PNGs are kept: `$MICROSCOPE_ARTIFACTS_DIR/screenshots/` when that is set (CI uploads it), else
`build/screenshots/` under the repository. Skipped when no Chromium is on PATH (`make test` installs
Debian's `chromium` when run as root: scripts/ensure_chromium.sh)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import FINISHED_RUN, REPO, VENV_BIN, free_port, wait_http

CHROMIUM = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the browser test needs one (`apt-get install chromium`; `make test` installs it as root)",
)

APP = REPO / "dashboard" / "app.py"
PAGES = sorted(p.stem for p in (REPO / "dashboard" / "views").glob("*.py") if not p.name.startswith("_"))
REQUIRED = ("overview", "layers", "evolution", "compare")
# Screenshotted: the pages the viewer is judged by, and the feature lab with a model in the loop (every page
# runs under AppTest in test_app.py). Layers first: see the test.
SHOWN = ("layers", "overview", "evolution", "compare", "lab")
WINDOW = (1400, 1800)
RENDER_TIMEOUT_S = 90

# What the page shows, read in the browser: the main area's text, its headings, exceptions, whether the
# script is still running (the status widget) and elements left stale from a previous run.
PAGE_STATE_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const sidebar = document.querySelector('[data-testid="stSidebar"]');
  return JSON.stringify({
    sidebar: sidebar ? sidebar.innerText : '',
    text: main ? main.innerText : '',
    html: main ? main.innerHTML.length : 0,
    headings: main ? main.querySelectorAll('h1, h2').length : 0,
    exceptions: document.querySelectorAll('[data-testid="stException"]').length,
    status: (document.querySelector('[data-testid="stStatusWidget"]') || {}).innerText || '',
    stale: document.querySelectorAll('[data-stale="true"]').length,
    skeleton: document.querySelectorAll('[data-testid="stSkeleton"]').length,
  });
})()"""


def screenshot_dir() -> Path:
    base = os.environ.get("MICROSCOPE_ARTIFACTS_DIR")
    out = Path(base) / "screenshots" if base else REPO / "build" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (`streamlit`/`chromium` and their children), SIGKILL what stays."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def viewer(store: str, log: Path) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on `store` (as `microscope view --store` sets it); its base URL."""
    port = free_port()
    env = {**os.environ, "MICROSCOPE_STORE": store, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [str(VENV_BIN / "streamlit"), "run", str(APP), "--server.headless", "true", "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    cmd += ["--server.fileWatcherType", "none"]  # a source file edited meanwhile must not rerun the page
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/_stcore/health", 120, proc)
        yield base
    finally:
        stop_group(proc)


class Chromium:
    """Headless Chromium with one tab, driven over the DevTools protocol (websockets' sync client)."""

    def __init__(self, profile: Path, log: Path) -> None:
        cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        cmd += [f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-dev-shm-usage", "--no-first-run"]
        cmd += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._id = 0
        try:
            port = self._devtools_port(profile)
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            page = next(t for t in targets if t["type"] == "page")
            from websockets.sync.client import connect

            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            # --window-size includes the browser's frame: make the viewport exactly the window's size
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=WINDOW[0],
                height=WINDOW[1],
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            stop_group(self.proc)
            raise

    def _devtools_port(self, profile: Path) -> int:
        """Chromium writes the port it chose (`--remote-debugging-port=0`) to DevToolsActivePort."""
        deadline = time.monotonic() + 60
        active = profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before opening DevTools")
            if active.exists() and (first := active.read_text().split("\n")[0].strip()):
                return int(first)
            time.sleep(0.2)
        raise RuntimeError("chromium did not open its DevTools port within 60 s")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def page_state(self) -> dict[str, Any]:
        res = self.call("Runtime.evaluate", expression=PAGE_STATE_JS, returnByValue=True)
        return json.loads(res["result"]["value"])

    def render(self, url: str, expected: tuple[str, ...]) -> dict[str, Any]:
        """Open `url` and wait until the main area holds every `expected` text and a heading, the script
        has stopped, nothing is stale, and the DOM is the same on two polls (charts drawn); that state."""
        self.call("Page.navigate", url="about:blank")  # so that the previous page cannot pass for this one
        for _ in range(200):
            if self.call("Runtime.evaluate", expression="location.href")["result"].get("value") == "about:blank":
                break
            time.sleep(0.05)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        last: dict[str, Any] = {}
        steady = 0
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.page_state()
            done = (
                now["headings"] > 0
                and all(t in now["text"] for t in expected)
                and "Running" not in now["status"]
                and not now["stale"]
                and not now["skeleton"]
            )
            same = (now["text"], now["html"]) == (last.get("text"), last.get("html"))
            steady = steady + 1 if done and same else 0
            last = now
            if steady >= 2 or (now["exceptions"] and "Running" not in now["status"]):
                return now
        raise AssertionError(f"{url} did not render {expected} within {RENDER_TIMEOUT_S}s; main showed:\n{last}")

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_group(self.proc)


def assert_not_blank(png: bytes, where: str) -> None:
    """A rendered page: the window's size, many colours (text, tables, charts) and real contrast; a blank
    or skeleton page is a few flat greys."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == WINDOW, (where, img.size)
    px = np.asarray(img).reshape(-1, 3)
    colours = len(np.unique(px, axis=0))
    std = float(px.std())
    assert colours >= 64 and std >= 8, f"{where} looks blank: {colours} colours, pixel std {std:.1f}"


@pytest.fixture(scope="module")
def audits(finished_audits: dict[str, dict]) -> dict[str, str]:
    step1, step2 = finished_audits["step1"], finished_audits["step2"]
    return {"store": step2["store_uri"], "step1": step1["audit_id"], "step2": step2["audit_id"]}


def page_url(base: str, page: str, audits: dict[str, str]) -> str:
    return f"{base}/{page}?{urlencode({'audit': audits['step2']})}"


def test_every_page_renders_in_chromium(audits: dict[str, str], tmp_path: Path) -> None:
    assert set(REQUIRED) <= set(PAGES), PAGES
    step1, step2 = audits["step1"], audits["step2"]
    # What each page's main area must show once rendered; a page without an entry (one added later)
    # must at least show a heading and no exception.
    expected = {
        "audits": ("Audits", f"Selected {step2}"),  # the table itself is a canvas: no text to read
        "overview": (f"Audit {step2}",),
        "layers": (f"Layers · {step2}", "Matrix"),
        "evolution": ("Evolution", FINISHED_RUN, "Layer table at step 2"),
        "compare": ("Compare", f"A = {step2}", f"B = {step1}"),
        "lab": (f"Feature lab · {step2}", "Clean vs edited", "Off-target cost"),  # the model loaded and steered
    }
    out = screenshot_dir()
    shots = []
    with viewer(audits["store"], tmp_path / "streamlit.log") as base:
        browser = Chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log")
        try:
            # Layers first: a shared link as a fresh viewer's first request must run inside the app (its
            # sidebar: store, audit), which is why the views live in dashboard/views/, not pages/ (that
            # folder Streamlit would run as v1 pages, alone).
            for page in SHOWN:
                shown = browser.render(page_url(base, page, audits), expected.get(page, ()))
                path = out / f"{page}.png"
                png = browser.screenshot(path)
                shots.append(path)
                print(f"screenshot: {path}")
                assert not shown["exceptions"], f"{page}: an exception on the page:\n{shown['text'][:3000]}"
                assert "Page not found" not in shown["text"], page
                assert "Store" in shown["sidebar"] and "in the store" in shown["sidebar"], (page, shown["sidebar"])
                assert_not_blank(png, page)
        finally:
            browser.close()
    assert [p.stem for p in shots] == list(SHOWN)
