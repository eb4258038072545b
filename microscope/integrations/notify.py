"""Tell Microscope a checkpoint is ready: sign a `CheckpointReady` message (Standard Webhooks) and POST it
to the webhook receiver, from a training job, without ever holding training up.

    notifier = Notifier()                       # MICROSCOPE_WEBHOOK_URL, MICROSCOPE_WEBHOOK_SECRET
    notifier.submit(CheckpointReady(checkpoint="s3://b/run7/step-200", run_id="run7", step=200))
    notifier.send(message)                      # synchronous (the CLI): Accepted, or NotifyError

Delivery. One daemon thread per `Notifier` drains a bounded queue, so `submit` returns a Future at once
(a full queue fails that Future with a warning; nothing is raised into training). Each message is tried
until `give_up_after_s` after it was submitted: exponential backoff with full jitter (0.5 s doubling, capped
at 30 s; a Retry-After in seconds or as a date wins) on connection errors, timeouts, 408, 425, 429 and 5xx.
Any other 4xx means the message itself is wrong, so it is given up at once with the receiver's detail.
Every attempt of one message carries the same `webhook-id` (the receiver dedupes on it) and a fresh
timestamp and signature (the receiver refuses timestamps more than 5 minutes off, and a retry may come
later than that). Give-ups are one-line warnings on the `microscope.notify` logger.

Exit. `close(timeout_s)` lets the queue drain for at most that long, then fails what is left; it is
registered with `atexit`, so a training script's exit waits a bounded time and never hangs on a receiver
that is down (the thread is a daemon: an upload still running is abandoned with the process).

Upload. With `upload_to="s3://bucket/prefix"` the worker first uploads `local_path` (a file or a folder,
multipart via boto3's `upload_file`; endpoint `MICROSCOPE_S3_ENDPOINT_URL`) to
`s3://bucket/prefix/<run_id>/<basename>` and sends that URI as `checkpoint`, so pods that cannot see the
training machine's disk can read it. Upload failures are retried like network errors.
"""

from __future__ import annotations

import atexit
import contextlib
import email.utils
import logging
import os
import queue
import random
import threading
import time
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.webhook import MAX_BODY_BYTES, Accepted, CheckpointReady

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("microscope.notify")

BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_STATUS = frozenset({408, 425, 429})  # and every 5xx
_IDLE_POLL_S = 0.2  # how often an idle worker looks whether it has been closed


class NotifyError(RuntimeError):
    """A checkpoint message was not delivered (given up, refused, or never sent); the text is one line."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def signed_headers(secret: str, body: str, msg_id: str | None = None, now: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`) for `body`
    signed with `secret` (`whsec_<base64>`) at `now` (unix seconds; default: now), plus content-type."""
    from standardwebhooks.webhooks import Webhook

    msg_id = msg_id or new_message_id()
    seconds = int(time.time() if now is None else now)  # whole seconds: what the header carries is what's signed
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(seconds, tz=UTC), body)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature,
    }


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _resolve(url: str | None, secret: str | None) -> tuple[str, str]:
    """The receiver's URL and the signing secret, from the arguments or the settings; ValueError naming the
    variable to set when either is missing or the secret is not a Standard Webhooks secret."""
    from microscope.settings import get_settings

    settings = get_settings()
    url = url or settings.webhook_url
    if not url:
        raise ValueError(
            "no webhook URL: pass url=... or set MICROSCOPE_WEBHOOK_URL (e.g. https://host/v1/checkpoints)"
        )
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook URL {url!r} must start with http:// or https:// (MICROSCOPE_WEBHOOK_URL)")
    if not secret:
        secrets = settings.webhook_secrets()
        secret = secrets[0] if secrets else None
    if not secret:
        raise ValueError("no webhook secret: pass secret=... or set MICROSCOPE_WEBHOOK_SECRET (whsec_<base64>)")
    try:
        from standardwebhooks.webhooks import Webhook

        Webhook(secret)
    except Exception as e:  # noqa: BLE001 -- binascii.Error, EmptyWebhookSecretError, ...
        raise ValueError(
            f"the webhook secret is not a Standard Webhooks secret ({type(e).__name__}); "
            "MICROSCOPE_WEBHOOK_SECRET must look like whsec_<base64>"
        ) from None
    return url, secret


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _detail(response: httpx.Response) -> str:
    """The receiver's error detail in one line (FastAPI: {"detail": str | [{"loc", "msg"}, ...]})."""
    try:
        detail: Any = response.json().get("detail", response.text)
    except Exception:  # noqa: BLE001 -- not JSON, or not an object
        detail = response.text
    if isinstance(detail, list):  # pydantic validation errors: "field.path: message; ..."
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(x) for x in d.get("loc", ()) if x != "body")
                parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
            else:
                parts.append(str(d))
        detail = "; ".join(parts)
    return _one_line(str(detail) or response.reason_phrase)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds to wait: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(tz=UTC)).total_seconds())


def upload(local_path: str | os.PathLike[str], upload_to: str, run_id: str) -> str:
    """Upload the file or folder `local_path` to `upload_to/<run_id>/<basename>` (upload_to =
    s3://bucket[/prefix]); returns the uploaded URI. A folder's files keep their relative paths."""
    import boto3

    from microscope.settings import get_settings

    bucket, prefix = _split_s3(upload_to)
    src = Path(local_path)
    if not src.exists():
        raise FileNotFoundError(f"nothing to upload: {src} does not exist")
    key = "/".join(p for p in (prefix, run_id.strip("/"), src.name) if p)
    s3 = boto3.client("s3", endpoint_url=get_settings().s3_endpoint_url)
    if src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            s3.upload_file(str(f), bucket, f"{key}/{f.relative_to(src).as_posix()}")
    else:
        s3.upload_file(str(src), bucket, key)  # multipart above boto3's threshold (8 MiB)
    return f"s3://{bucket}/{key}"


def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"upload_to={uri!r} must be s3://bucket or s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


class _Item:
    __slots__ = ("deadline", "future", "local_path", "message", "upload_to")

    def __init__(
        self, message: CheckpointReady, upload_to: str | None, local_path: str | None, deadline: float
    ) -> None:
        self.message, self.upload_to, self.local_path, self.deadline = message, upload_to, local_path, deadline
        self.future: Future[Accepted] = Future()


class Notifier:
    """Signs and POSTs checkpoint messages to the webhook receiver; see the module docstring.

    url, secret: the receiver and the signing secret (default: MICROSCOPE_WEBHOOK_URL and the first of
    MICROSCOPE_WEBHOOK_SECRET). timeout_s: per HTTP request. give_up_after_s: how long one message is
    retried, counted from its submission. max_pending: queued messages before `submit` refuses more.
    """

    def __init__(
        self,
        url: str | None = None,
        secret: str | None = None,
        timeout_s: float = 10.0,
        give_up_after_s: float = 600.0,
        max_pending: int = 256,
    ) -> None:
        self.url, self._secret = _resolve(url, secret)
        if timeout_s <= 0 or give_up_after_s < 0 or max_pending < 1:
            raise ValueError(
                f"timeout_s={timeout_s} must be > 0, give_up_after_s={give_up_after_s} >= 0, max_pending={max_pending} >= 1"
            )
        self.timeout_s = timeout_s
        self.give_up_after_s = give_up_after_s
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()  # no more submissions; the worker exits once the queue is empty
        self._abort = threading.Event()  # close() ran out of time: stop waiting between attempts
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"Notifier(url={self.url!r}, pending={self._queue.qsize()})"

    # ---- public -------------------------------------------------------------------------------------

    def submit(
        self, message: CheckpointReady, upload_to: str | None = None, local_path: str | None = None
    ) -> Future[Accepted]:
        """Queue `message` for delivery and return at once. The Future resolves to the receiver's
        `Accepted`, or fails with NotifyError (also logged as a warning); nothing is raised here."""
        item = _Item(message, upload_to, local_path, time.monotonic() + self.give_up_after_s)
        try:
            self._check_upload(upload_to, local_path)
            with self._lock:
                if self._closing.is_set():
                    raise NotifyError("the notifier is closed")
                self._queue.put_nowait(item)
                self._ensure_worker()
        except queue.Full:
            self._fail(
                item,
                NotifyError(f"{self._queue.maxsize} checkpoint messages already pending; not queued (receiver down?)"),
            )
        except Exception as e:  # noqa: BLE001 -- submit never raises into training
            self._fail(item, e if isinstance(e, NotifyError) else NotifyError(_one_line(str(e))))
        return item.future

    def send(self, message: CheckpointReady, upload_to: str | None = None, local_path: str | None = None) -> Accepted:
        """Deliver `message` now (retrying as `submit` does) and return the receiver's answer; NotifyError
        with a one-line reason when it gives up."""
        import httpx

        try:
            self._check_upload(upload_to, local_path)
        except ValueError as e:
            raise NotifyError(str(e)) from None
        deadline = time.monotonic() + self.give_up_after_s
        with httpx.Client(timeout=self.timeout_s) as client:
            return self._deliver(client, message, upload_to, local_path, deadline)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking messages; let the pending ones go for at most `timeout_s`, then fail what is left
        with a warning. Safe to call more than once; runs at interpreter exit."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        with self._lock:
            self._closing.set()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout_s))
            if thread.is_alive():
                self._abort.set()  # the attempt in flight ends within timeout_s; no more waiting after it
        left = self._drain()
        if left:
            log.warning(
                "closed with %d checkpoint message(s) undelivered after waiting %.0f s (receiver %s)",
                left,
                timeout_s,
                self.url,
            )

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # ---- worker -------------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="microscope-notify", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                try:
                    item = self._queue.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    with self._lock:
                        if self._closing.is_set() and self._queue.empty():
                            self._thread = None
                            return
                    continue
                if self._abort.is_set():  # close() ran out of time: fail the rest without trying
                    self._fail(item, NotifyError("the notifier closed before this message was sent"))
                    continue
                if not item.future.set_running_or_notify_cancel():
                    continue
                try:
                    accepted = self._deliver(client, item.message, item.upload_to, item.local_path, item.deadline)
                except Exception as e:  # noqa: BLE001 -- the worker outlives any one message
                    self._fail(item, e if isinstance(e, NotifyError) else NotifyError(_one_line(repr(e))))
                else:
                    item.future.set_result(accepted)

    def _drain(self) -> int:
        """Fail every message still queued (after close ran out of time); returns how many."""
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            n += 1
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(NotifyError("the notifier closed before this message was sent"))

    @staticmethod
    def _fail(item: _Item, error: Exception) -> None:
        m = item.message
        log.warning("checkpoint %s (run %s, step %d) not delivered: %s", m.checkpoint, m.run_id, m.step, error)
        if item.future.running() or item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)

    @staticmethod
    def _check_upload(upload_to: str | None, local_path: str | None) -> None:
        if upload_to is None:
            return
        _split_s3(upload_to)
        if local_path is None:
            raise ValueError("upload_to needs local_path: the file or folder to upload")

    # ---- one message --------------------------------------------------------------------------------

    def _deliver(
        self,
        client: httpx.Client,
        message: CheckpointReady,
        upload_to: str | None,
        local_path: str | None,
        deadline: float,
    ) -> Accepted:
        msg_id = new_message_id()  # one id for every attempt: the receiver dedupes on it
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                if upload_to is not None and local_path is not None:
                    message = message.model_copy(update={"checkpoint": self._upload(local_path, upload_to, message)})
                    upload_to = None  # uploaded: later attempts only POST
                return self._attempt(client, message, msg_id)
            except _Retryable as e:
                now = time.monotonic()
                if now >= deadline or self._abort.is_set():
                    why = "the notifier closed" if self._abort.is_set() else f"{now - started:.0f} s"
                    raise NotifyError(f"gave up after {attempt} attempt(s) ({why}); last: {e}") from None
                delay = random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (attempt - 1)))
                if e.retry_after is not None:
                    delay = e.retry_after
                delay = min(delay, deadline - now)
                log.info("checkpoint message attempt %d failed (%s); retrying in %.1f s", attempt, e, delay)
                if self._abort.wait(delay):
                    raise NotifyError(f"the notifier closed after {attempt} attempt(s); last: {e}") from None

    @staticmethod
    def _upload(local_path: str, upload_to: str, message: CheckpointReady) -> str:
        if not Path(local_path).exists():  # not worth retrying
            raise NotifyError(f"nothing to upload: {local_path} does not exist")
        try:
            return upload(local_path, upload_to, message.run_id)
        except Exception as e:
            raise _Retryable(f"upload to {upload_to} failed: {_one_line(f'{type(e).__name__}: {e}')}") from e

    def _attempt(self, client: httpx.Client, message: CheckpointReady, msg_id: str) -> Accepted:
        import httpx

        body = message.model_dump_json()
        if len(body.encode()) > MAX_BODY_BYTES:
            raise NotifyError(f"message is {len(body.encode())} bytes, over the receiver's {MAX_BODY_BYTES}")
        headers = signed_headers(self._secret, body, msg_id)  # fresh timestamp per attempt
        try:
            r = client.post(self.url, content=body.encode(), headers=headers)
        except httpx.TransportError as e:  # connect, read, write, timeouts, protocol errors
            raise _Retryable(_one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)) from e
        if r.is_success:
            try:
                return Accepted.model_validate_json(r.content)
            except ValueError:
                raise NotifyError(
                    f"receiver answered {r.status_code} but not with an Accepted record: {_one_line(r.text, 200)}"
                ) from None
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}: {_detail(r)}", _retry_after(r.headers.get("retry-after")))
        raise NotifyError(f"receiver refused it with HTTP {r.status_code} (not retried): {_detail(r)}")


# ---- convenience --------------------------------------------------------------------------------------

_shared: dict[tuple[str, str], Notifier] = {}
_shared_lock = threading.Lock()


def shared_notifier(url: str | None = None, secret: str | None = None) -> Notifier:
    """One Notifier (one worker thread) per receiver and secret in this process."""
    key = _resolve(url, secret)
    with _shared_lock:
        n = _shared.get(key)
        if n is None or n._closing.is_set():
            n = _shared[key] = Notifier(*key)
        return n


def notify_checkpoint(
    checkpoint: str | os.PathLike[str],
    run_id: str,
    step: int,
    *,
    url: str | None = None,
    secret: str | None = None,
    wait: bool = False,
    upload_to: str | None = None,
    **fields: Any,
) -> Future[Accepted] | Accepted:
    """Tell Microscope `checkpoint` of `run_id` at `step` is ready. `fields`: the other CheckpointReady
    fields (dataset, config, stages, tags, callback_url). With `upload_to`, `checkpoint` is a local file or
    folder uploaded there first. wait=False: queued (returns a Future, never raises on delivery);
    wait=True: sent now (returns Accepted, raises NotifyError)."""
    message = CheckpointReady(checkpoint=str(checkpoint), run_id=run_id, step=step, **fields)
    notifier = shared_notifier(url, secret)
    local = str(checkpoint) if upload_to else None
    if wait:
        return notifier.send(message, upload_to=upload_to, local_path=local)
    return notifier.submit(message, upload_to=upload_to, local_path=local)
