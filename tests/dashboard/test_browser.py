"""The viewer in a real browser: `streamlit run dashboard/app.py` on the finished audits of a tiny GPT-2,
every page (one per file in dashboard/views/) opened in headless Chromium and looked at 1600 and 1000 px
wide. Streamlit renders client-side over a websocket, so a plain `chromium --screenshot` can catch the
skeleton: the test drives Chromium through the DevTools protocol instead, waits until the page's main
area shows what it must (the audit id, the run, the page header) and the script has stopped running,
then captures the viewport; then narrows the viewport to 1000 px (the browser reflows the same page, no
rerun), waits until the DOM is steady again and captures it again. At each width a page must show no
exception and no "Page not found", its sidebar the store, its main area its expected texts, a screenshot
that is not blank, and no horizontal overflow (the main area and the document no wider than the window).

The PNGs (`<page>-1600.png`, `<page>-1000.png`) are kept: `$MICROSCOPE_ARTIFACTS_DIR/screenshots/` when
that is set (CI uploads it), else `build/screenshots/` under the repository. Skipped when no Chromium is
on PATH (`make test` installs Debian's `chromium` when run as root: scripts/ensure_chromium.sh)."""

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
# Layers first (the module runs in this order on one worker): see test_page_renders_at_1600_and_1000.
ORDER = sorted(PAGES, key=lambda page: page != "layers")
WIDE, NARROW = (1600, 1100), (1000, 1100)
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

# Horizontal overflow: the main area's and the document's scroll widths against their visible widths, and
# when either is wider, the outermost elements that stick out past the main area's right edge (which to fix).
OVERFLOW_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const doc = document.documentElement;
  const out = {
    main: main ? [main.scrollWidth, main.clientWidth] : [0, 0],
    doc: [doc.scrollWidth, window.innerWidth],
    culprits: [],
  };
  if (main && (main.scrollWidth > main.clientWidth + 1 || doc.scrollWidth > window.innerWidth + 1)) {
    const edge = Math.min(main.getBoundingClientRect().left + main.clientWidth, window.innerWidth) + 1;
    const past = (e) => e.getBoundingClientRect().right > edge;
    // an element inside a box that scrolls or clips it (a dataframe, a code block) widens nothing
    const clipped = (e) => {
      for (let a = e.parentElement; a && a !== main; a = a.parentElement) {
        if (getComputedStyle(a).overflowX !== 'visible') return true;
      }
      return false;
    };
    for (const e of main.querySelectorAll('*')) {
      if (past(e) && !past(e.parentElement) && !clipped(e) && out.culprits.length < 8) {
        const r = e.getBoundingClientRect();
        const id = e.getAttribute('data-testid') || e.className.toString().slice(0, 60);
        const text = (e.innerText || '').slice(0, 60).replace(/\\s+/g, ' ');
        out.culprits.push(`<${e.tagName.toLowerCase()} ${id}> x ${Math.round(r.left)}..${Math.round(r.right)} "${text}"`);
      }
    }
  }
  return JSON.stringify(out);
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
def viewer(store: str, log: Path, home: Path | None = None) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on `store` (as `microscope view --store` sets it), in the workspace
    `home` when given (else the settings' default: the repository's .microscope); its base URL."""
    port = free_port()
    env = {**os.environ, "MICROSCOPE_STORE": store, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    if home is not None:
        env["MICROSCOPE_HOME"] = str(home)
    env["MICROSCOPE_VIEWER_PREWARM"] = "true"  # as deployed: the warm-up imports while the pages are opened
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
    """Headless Chromium with one tab, driven over the DevTools protocol (websockets' sync client); its
    viewport is `size` (width, height) until `resize`."""

    def __init__(self, profile: Path, log: Path, size: tuple[int, int] = WIDE) -> None:
        cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        cmd += [f"--window-size={size[0]},{size[1]}", "--disable-dev-shm-usage", "--no-first-run"]
        cmd += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._id = 0
        self.size = size
        try:
            port = self._devtools_port(profile)
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            page = next(t for t in targets if t["type"] == "page")
            from websockets.sync.client import connect

            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            # --window-size includes the browser's frame: make the viewport exactly the window's size
            self.resize(*size)
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

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def page_state(self) -> dict[str, Any]:
        return json.loads(self.evaluate(PAGE_STATE_JS))

    def overflow(self) -> dict[str, Any]:
        """The main area's [scrollWidth, clientWidth], the document's [scrollWidth, innerWidth], and what
        sticks out when either is wider (see OVERFLOW_JS)."""
        return json.loads(self.evaluate(OVERFLOW_JS))

    def resize(self, width: int, height: int) -> None:
        """Set the viewport: the open page reflows in place (Streamlit does not rerun the script)."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.size = (width, height)

    def render(self, url: str, expected: tuple[str, ...]) -> dict[str, Any]:
        """Open `url` and wait until it has rendered (`settle`); that state."""
        self.call("Page.navigate", url="about:blank")  # so that the previous page cannot pass for this one
        for _ in range(200):
            if self.evaluate("location.href") == "about:blank":
                break
            time.sleep(0.05)
        self.call("Page.navigate", url=url)
        return self.settle(expected, url)

    def settle(self, expected: tuple[str, ...], where: str = "the page") -> dict[str, Any]:
        """Wait until the main area holds every `expected` text and a heading, the script has stopped,
        nothing is stale, and the DOM is the same on two polls (charts drawn, or redrawn after a resize)."""
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
        raise AssertionError(f"{where} did not render {expected} within {RENDER_TIMEOUT_S}s; main showed:\n{last}")

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_group(self.proc)


def assert_not_blank(png: bytes, where: str, size: tuple[int, int]) -> None:
    """A rendered page: the viewport's `size`, many colours (text, tables, charts) and real contrast; a
    blank or skeleton page is a few flat greys."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == size, (where, img.size)
    px = np.asarray(img).reshape(-1, 3)
    colours = len(np.unique(px, axis=0))
    std = float(px.std())
    assert colours >= 64 and std >= 8, f"{where} looks blank: {colours} colours, pixel std {std:.1f}"


@pytest.fixture(scope="module")
def audits(finished_audits: dict[str, dict]) -> dict[str, str]:
    step1, step2 = finished_audits["step1"], finished_audits["step2"]
    return {"store": step2["store_uri"], "step1": step1["audit_id"], "step2": step2["audit_id"]}


@pytest.fixture(scope="module")
def site(audits: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Chromium]]:
    """One viewer and one Chromium for the module: every page is a navigation in the same tab."""
    tmp = tmp_path_factory.mktemp("browser")
    # a workspace of its own: nothing of the developer's .microscope (its Qdrant index) shows through
    with viewer(audits["store"], tmp / "streamlit.log", home=tmp / "home") as base:
        browser = Chromium(tmp / "chromium-profile", tmp / "chromium.log", size=WIDE)
        try:
            yield base, browser
        finally:
            browser.close()


def page_url(base: str, page: str, audits: dict[str, str]) -> str:
    return f"{base}/{page}?{urlencode({'audit': audits['step2']})}"


def expected_texts(page: str, audits: dict[str, str]) -> tuple[str, ...]:
    """What a page's main area must show once rendered; a page without an entry (one added later) must at
    least show a heading and no exception."""
    step1, step2 = audits["step1"], audits["step2"]
    return {
        "audits": ("Audits", f"Selected {step2}"),  # the table itself is a canvas: no text to read
        "overview": (f"Audit {step2}",),
        "layers": (f"Layers · {step2}", "Matrix"),
        "evolution": ("Evolution", FINISHED_RUN, "Layer table at step 2"),
        "compare": ("Compare", f"A = {step2}", f"B = {step1}"),
        "lab": (f"Feature lab · {step2}", "Clean vs edited", "Off-target cost"),  # the model loaded and steered
        "architecture": (f"Architecture · {step2}", "GPT2LMHeadModel", "Weight matrices"),
        "matrix": (f"Matrix explorer · {step2}", "Weights"),
        "cka": (f"CKA · {step2}", "Between traced layers"),
        "sae": (f"SAE features · {step2}", "SAE (hook)"),
        "quantization": (f"Quantization · {step2}", "Fidelity and memory per format"),
        "lineage": (f"Lineage · {step2}", FINISHED_RUN),
        # the image stages did not run on a text model: the page says so under its header
        "robustness": (f"Robustness · {step2}", "robustness did not run"),
        "reliability": (f"Reliability · {step2}", "reliability did not run"),
        "attribution": (f"Attribution · {step2}", "Checks"),
        "landscape": (f"Loss landscape · {step2}",),
        "search": ("Search", "Nothing is indexed in Qdrant yet"),  # this workspace has no index
        "launch": ("Launch an audit", "Start audit"),
        "store": ("Store", "Leftovers"),
    }.get(page, ())


def test_required_pages_exist() -> None:
    assert set(REQUIRED) <= set(PAGES), PAGES


@pytest.mark.parametrize("page", ORDER)
def test_page_renders_at_1600_and_1000(page: str, site: tuple[str, Chromium], audits: dict[str, str]) -> None:
    # Layers runs first (ORDER) on a fresh viewer: a shared link as its first request must run inside the
    # app (its sidebar: store, audit), which is why the views live in dashboard/views/, not pages/ (that
    # folder Streamlit would run as v1 pages, alone).
    base, browser = site
    expected = expected_texts(page, audits)
    browser.resize(*WIDE)  # a page that failed at 1000 px left the viewport narrow
    shown = browser.render(page_url(base, page, audits), expected)
    for size in (WIDE, NARROW):
        where = f"{page} at {size[0]} px"
        if size != browser.size:
            browser.resize(*size)
            shown = browser.settle(expected, where)
        path = screenshot_dir() / f"{page}-{size[0]}.png"
        png = browser.screenshot(path)
        print(f"screenshot: {path}")
        assert not shown["exceptions"], f"{where}: an exception on the page:\n{shown['text'][:3000]}"
        assert "Page not found" not in shown["text"], where
        assert "Store" in shown["sidebar"] and "in the store" in shown["sidebar"], (where, shown["sidebar"])
        assert all(t in shown["text"] for t in expected), (where, expected, shown["text"][:3000])
        assert_not_blank(png, where, size)
        wide = browser.overflow()
        (main_scroll, main_client), (doc_scroll, window) = wide["main"], wide["doc"]
        assert main_scroll <= main_client + 1 and doc_scroll <= window + 1, f"{where} overflows sideways: {wide}"
