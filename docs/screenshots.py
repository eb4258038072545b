"""Screenshots of every viewer page on a store of finished audits (the demo's: `make demo`), at 1600 and
1000 px wide, into docs/images/viewer-<page>-<width>.png, for the README and for looking at each page as a
user sees it. Headless Chromium over the DevTools protocol (Debian: `apt-get install -y chromium`).

    python docs/screenshots.py [--store .microscope/artifacts] [--widths 1600 1000] [--pages overview layers]

Each page opens on the audit that shows it best: a run's checkpoint, the digits CNN for the image stages,
MiniLM for its SAE."""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from microscope import results  # noqa: E402
from microscope.store import open_store  # noqa: E402
from tests.dashboard import test_browser as browser  # noqa: E402

OUT = REPO / "docs" / "images"
HEIGHT = 1100
IMAGE_PAGES = {"robustness", "reliability", "landscape", "attribution", "quantization"}
ENCODER_PAGES = {"sae", "search"}
WAIT_FOR = {"lab": ("Clean vs edited",)}  # pages that keep working after their heading: what ends them


def _audits(store_uri: str) -> dict[str, str]:
    refs = results.list_audits(open_store(store_uri))
    run = [r for r in refs if r.run_id]
    pick = {
        "run": run[-2].audit_id if len(run) > 1 else refs[-1].audit_id,  # a healthy checkpoint before the last
        "image": next((r.audit_id for r in reversed(refs) if "CNN" in r.model_name), refs[-1].audit_id),
        "encoder": next((r.audit_id for r in reversed(refs) if r.model_name.startswith("Bert")), refs[-1].audit_id),
    }
    return pick


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(REPO / ".microscope" / "artifacts"))
    ap.add_argument("--widths", type=int, nargs="+", default=[1600, 1000])
    ap.add_argument("--pages", nargs="*", default=None)
    args = ap.parse_args(argv)
    from PIL import Image

    pages = args.pages or [p.stem for p in sorted((REPO / "dashboard" / "views").glob("*.py"))]
    pick = _audits(args.store)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="microscope-shots-"))
    with browser.viewer(args.store, tmp / "streamlit.log") as base:
        chrome = browser.Chromium(tmp / "profile", tmp / "chromium.log", size=(args.widths[0], HEIGHT))
        try:
            for page in pages:
                which = "image" if page in IMAGE_PAGES else "encoder" if page in ENCODER_PAGES else "run"
                url = f"{base}/{page}?{urlencode({'audit': pick[which]})}"
                wait_for = WAIT_FOR.get(page, ())
                # open each page once, at the first width; the others are the same page reflowed (no rerun)
                chrome.resize(args.widths[0], HEIGHT)
                state = chrome.render(url, wait_for)
                for i, width in enumerate(args.widths):
                    if i:
                        chrome.resize(width, HEIGHT)
                        state = chrome.settle(wait_for, f"{page} at {width} px")
                    png = chrome.screenshot(tmp / "shot.png")
                    path = OUT / f"viewer-{page}-{width}.png"
                    # a palette of 256 colours: a fifth of the bytes, the same picture for a UI
                    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)
                    flag = " (an exception on the page!)" if state["exceptions"] else ""
                    print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1024} KiB{flag}")
        finally:
            chrome.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
