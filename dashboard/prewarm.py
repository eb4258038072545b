"""Import the model libraries in the viewer's server process while no page is running, so that the first
page that loads a model (the Feature lab; Search's query embedding) does not pay for them.

Importing torch and transformers with a model's modules is 4–5 s of CPU on 2 cores, most of a cold Feature lab
(the model's weights load in well under a second). `WARM_UP.start()` runs once per process, after the first
page has rendered, in a daemon thread; `WARM_UP.page_run()` wraps each script run. The two never import at
the same time: two threads importing overlapping module graphs can deadlock on the import locks (Python then
hands one of them a half-initialised module), so a step of the warm-up waits until no page has run for a
second (a user reading, not clicking through), and a page that starts during a step waits for that one step
(about 1 s at most) to end, then goes first.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

# The steps, in import order; each is one module (what it imports comes with it), 0.1-1.2 s each here: a page
# waits for one at most. torch._dynamo (with torch.distributed.tensor) is most of what transformers' model
# core (`modeling_utils`, which every model module imports) spends on its import.
IDLE_S = 1.0  # a step starts once no page has run for this long: clicking through pages is never held back
STEPS = (
    "numpy",
    "torch",
    "torch._dynamo",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.bert.modeling_bert",
    "transformers.models.gpt2.modeling_gpt2",
)


class WarmUp:
    """Imports `steps` in a background thread, one at a time, never while a page runs."""

    def __init__(self, steps: tuple[str, ...] = STEPS, idle_s: float = IDLE_S) -> None:
        self.steps = steps
        self.idle_s = idle_s
        self.done = threading.Event()  # set when every step ran (or one failed)
        self.imported: list[str] = []
        self._cond = threading.Condition()
        self._pages = 0  # script runs in progress
        self._waiting = 0  # script runs waiting for a step to end: they go before the next step
        self._importing = False  # a step is importing
        self._last_end = time.monotonic()  # when the last page run ended
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def page_run(self) -> Iterator[None]:
        """Around a script run: waits for a step in progress, keeps the next one from starting."""
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._importing)
            self._waiting -= 1
            self._pages += 1
        try:
            yield
        finally:
            with self._cond:
                self._pages -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def _warm(self) -> None:
        try:
            for name in self.steps:
                self._wait_idle()
                try:
                    importlib.import_module(name)
                    self.imported.append(name)
                except Exception as exc:  # noqa: BLE001 -- only a speed-up: a page imports what it needs itself
                    log.info("viewer warm-up stopped at %s: %s", name, exc)
                    return
                finally:
                    with self._cond:
                        self._importing = False
                        self._cond.notify_all()
        finally:
            self.done.set()

    def _wait_idle(self) -> None:
        """Until no page has run for `idle_s` (a user reading a page, not clicking through), then claim it."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pages == 0 and self._waiting == 0)
                idle = time.monotonic() - self._last_end
                if idle >= self.idle_s:
                    self._importing = True
                    return
            time.sleep(self.idle_s - idle)

    def start(self) -> None:
        """Start the warm-up (once: later calls do nothing)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._warm, name="microscope-viewer-warm-up", daemon=True)
        self._thread.start()


WARM_UP = WarmUp()  # the server process's one
