"""The webhook receiver: training jobs POST "checkpoint ready", an audit starts, exactly once.

Open-source Prefect has no inbound webhooks, so this small FastAPI service verifies the Standard
Webhooks signature, validates the body (schemas/webhook.py) and creates a flow run of the audit
deployment through the Prefect REST API with an idempotency key derived from the content: the same
(run_id, step, checkpoint) is one flow run whichever delivery, replica or restart it arrives through,
because the Prefect server is the one place that dedupes. It keeps no state of its own. Announced again
after its audit failed, crashed or was cancelled, a checkpoint is audited again (five times at most).

    POST /v1/checkpoints             202 {flow_run_id, deployment, duplicate} | 401 | 408 | 413 | 422 | 431 | 503
    GET  /v1/checkpoints/{id}        the run's state; when finished, the audit's status, report, figures
    GET  /v1/schema                  the body's JSON Schema
    GET  /healthz  /readyz  /metrics liveness, readiness (Prefect reachable), Prometheus counters

Anything a sender can send gets a 4xx or a 503 (retry later; nothing is lost), never a 500 and never a
TCP reset: headers over 16 KiB get 431, headers or a body slower than MICROSCOPE_WEBHOOK_READ_TIMEOUT_S
get 408. A valid message is refused (422) when a path it names lies outside the allowed roots
(MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS) or its callback_url reaches a non-public address (unless
MICROSCOPE_CALLBACK_ALLOW_PRIVATE). The access log is one JSON line per request, without secrets or bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from deployments.webhook_transport import MAX_HEADER_BYTES, guarded_protocol, listen
from microscope.result_callback import CallbackRefused, CallbackUnresolved, callback_target
from microscope.settings import get_settings
from schemas.webhook import MAX_BODY_BYTES, Accepted, AuditStatus, CheckpointReady, normalise_root

log = logging.getLogger("microscope.webhook")
RETRY_AFTER_S = 5
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ENDED_BADLY = FINAL - {"COMPLETED"}  # a checkpoint announced again after such an audit is audited again
MAX_REAUDITS = 5  # ... this many times at most
# An oversized body is read to its end (and dropped) before the 413: closing with unread bytes makes the
# kernel send a RST that can destroy the response, and the sender then retries a "network error" forever.
# Within bounds, though: beyond these the 413 goes out at once with `Connection: close`.
DRAIN_MAX_BYTES = 64 * 2**20
DRAIN_MAX_S = 30.0
DNS_TIMEOUT_S = 5.0
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class Unavailable(Exception):
    """The Prefect API cannot take the flow run now: the sender should retry."""


class PrefectApi:
    """The few Prefect REST calls the receiver makes, with short timeouts and no retries of its own (the
    sender retries, and a 503 should come back fast)."""

    def __init__(self, url: str, headers: dict[str, str], deployment: str):
        self.http = httpx.AsyncClient(base_url=url.rstrip("/") + "/", headers=headers, timeout=10)
        self.deployment = deployment
        self._deployment_id: str | None = None

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise Unavailable(f"Prefect API unreachable ({type(exc).__name__})") from None
        if r.status_code >= 500 or r.status_code == 429:
            raise Unavailable(f"Prefect API answered {r.status_code}")
        return r

    async def deployment_id(self) -> str:
        if self._deployment_id is None:
            r = await self._call("GET", f"deployments/name/{self.deployment}")
            if r.status_code == 404:  # not registered (yet): a deploy fixes it, so the sender should retry
                raise Unavailable(f"deployment {self.deployment} is not registered; run `make deploy`")
            r.raise_for_status()
            self._deployment_id = r.json()["id"]
        return self._deployment_id

    async def start(self, msg: CheckpointReady) -> tuple[str, bool]:
        """(flow run id, duplicate): the server answers 201 for a new run, 200 for the idempotency key's run.
        A checkpoint announced again after its audit failed, crashed or was cancelled is audited again: the
        new run's key names the ended one, so concurrent re-deliveries still start it once."""
        dep = await self.deployment_id()
        key = msg.idempotency_key()
        for _ in range(MAX_REAUDITS + 1):
            body = {"parameters": msg.flow_parameters(), "idempotency_key": key, "tags": ["webhook"]}
            r = await self._call("POST", f"deployments/{dep}/create_flow_run", json=body)
            if r.status_code == 404:
                self._deployment_id = None  # deleted and re-registered: look it up again next time
                raise Unavailable(f"deployment {self.deployment} is not registered; run `make deploy`")
            if r.status_code in (400, 409, 422):
                raise ValueError(_prefect_detail(r))
            r.raise_for_status()
            run = r.json()
            if r.status_code != 200 or _state_type(run) not in ENDED_BADLY:
                return run["id"], r.status_code == 200
            key = f"{msg.idempotency_key()}-after-{run['id']}"
        return run["id"], True  # as many audits of it ended badly: announcing it again starts no more

    async def flow_run(self, flow_run_id: str) -> dict[str, Any] | None:
        r = await self._call("GET", f"flow_runs/{flow_run_id}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    async def healthy(self) -> bool:
        try:
            return (await self._call("GET", "health")).status_code == 200
        except Unavailable:
            return False


def _state_type(run: dict[str, Any]) -> str | None:
    return run.get("state_type") or (run.get("state") or {}).get("type")


def _prefect_detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return f"the audit deployment refused the parameters: {str(detail)[:300]}"


def _prefect_headers() -> dict[str, str]:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    if key := PREFECT_API_KEY.value():
        return {"Authorization": f"Bearer {key.get_secret_value() if hasattr(key, 'get_secret_value') else key}"}
    if auth := PREFECT_API_AUTH_STRING.value():
        import base64

        raw = auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth
        return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}
    return {}


def check_secret(secret: str) -> None:
    """A Standard Webhooks secret: whsec_ and a non-empty base64 key (else every delivery would be refused)."""
    import base64
    import binascii

    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError(
            "MICROSCOPE_WEBHOOK_SECRET holds a secret that is empty or not base64 after 'whsec_'; "
            "create one with `microscope webhook secret`"
        )


def check_roots(roots: Sequence[str]) -> list[str]:
    """The allowed roots, normalised (`normalise_root`); ValueError when there are none, since a receiver that
    refuses every checkpoint helps nobody."""
    if not roots:
        raise ValueError(
            "MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS is empty, so every checkpoint would be refused; list where "
            "checkpoints may come from, e.g. 's3://ckpts/ /data/checkpoints/' (default: s3://)"
        )
    return [normalise_root(r) for r in roots]


def _unsigned(headers: dict[str, str]) -> str | None:
    """Which signature headers are missing, or None."""
    missing = [h for h in SIGNATURE_HEADERS if not headers.get(h)]
    if not missing:
        return None
    return f"missing {', '.join(missing)} header{'s' if len(missing) > 1 else ''}"


def _verify(secrets: list[str], text: str, headers: dict[str, str]) -> str | None:
    """None when one of the secrets signed this body at an acceptable time; else why not (for the log)."""
    from standardwebhooks.webhooks import Webhook

    if why := _unsigned(headers):
        return why
    if not re.fullmatch(r"[0-9]{1,15}", headers["webhook-timestamp"]):
        return "webhook-timestamp is not a unix time in whole seconds"
    reason = "signature does not match"
    for secret in secrets:
        try:
            Webhook(secret).verify(text, headers, json_parse=False)
            return None
        except Exception as exc:  # noqa: BLE001 -- malformed headers raise ValueError, binascii.Error, ...: all mean "not signed"
            msg = str(exc).lower()
            reason = "timestamp too old or too new" if "timestamp" in msg else reason
    return reason


def _field_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:10])


def create_app(prefect_url: str | None = None) -> FastAPI:
    s = get_settings()
    secrets = s.webhook_secrets()
    if not secrets:
        raise ValueError("MICROSCOPE_WEBHOOK_SECRET is not set; create one with `microscope webhook secret`")
    for secret in secrets:  # a receiver that reports healthy and then refuses every delivery helps nobody
        check_secret(secret)
    roots = check_roots(s.webhook_checkpoint_roots)
    allow_private, read_timeout_s = s.callback_allow_private, s.webhook_read_timeout_s
    from prefect.settings import PREFECT_API_URL  # after the checks above: a second of imports

    url = prefect_url or PREFECT_API_URL.value()
    if not url:
        raise ValueError("PREFECT_API_URL is not set; point it at the Prefect server that runs the audits")

    registry = CollectorRegistry()
    deliveries = Counter(
        "microscope_webhook_deliveries", "Checkpoint deliveries by outcome.", ["outcome", "reason"], registry=registry
    )
    latency = Histogram("microscope_webhook_request_seconds", "Request latency.", ["path"], registry=registry)
    api = PrefectApi(url, _prefect_headers(), s.audit_deployment)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await api.http.aclose()

    app = FastAPI(title="Microscope webhook receiver", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.prefect = api

    @app.middleware("http")
    async def access_log(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        request.state.log = {}
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = _json(503, {"detail": "internal error; retry later"}, retry=True)
        dt = time.perf_counter() - t0
        route = request.scope.get("route")
        latency.labels(getattr(route, "path", "unmatched")).observe(dt)
        line = {"method": request.method, "path": request.url.path, "status": response.status_code}
        line |= {"ms": round(dt * 1000, 1), "client": request.client.host if request.client else None}
        log.info(json.dumps(line | request.state.log, separators=(",", ":")))
        return response

    def refuse(request: Request, status: int, reason: str, detail: str) -> JSONResponse:
        deliveries.labels("refused", reason).inc()
        request.state.log |= {"outcome": "refused", "reason": reason}
        return _json(status, {"detail": detail}, retry=status == 503)

    async def too_large(request: Request, chunks: AsyncIterator[bytes], seen: int) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        # A client waiting for `100 Continue` has sent no body yet: answer now instead of inviting it.
        waiting = request.headers.get("expect", "").lower() == "100-continue"
        fits = not (declared.isdigit() and int(declared) > DRAIN_MAX_BYTES)
        drained = not waiting and fits and await _discard(chunks, seen)
        response = refuse(request, 413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
        if not drained:  # the rest of the body may still come: end the connection rather than read it
            response.headers["connection"] = "close"
        return response

    async def read_body(request: Request) -> bytes | Response:
        """The body, or the answer to one too large (413) or too slow (408: it would hold the connection)."""
        declared = request.headers.get("content-length", "")
        chunks = request.stream()
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await too_large(request, chunks, 0)
        body = bytearray()
        try:
            async with asyncio.timeout(read_timeout_s):
                async for chunk in chunks:
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        break
        except TimeoutError:
            detail = f"body not received within {read_timeout_s:g} s; send it at once"
            response = refuse(request, 408, "slow_body", detail)
            response.headers["connection"] = "close"
            return response
        if len(body) > MAX_BODY_BYTES:  # outside the read deadline: draining has its own
            return await too_large(request, chunks, len(body))
        return bytes(body)

    @app.post("/v1/checkpoints", status_code=202, response_model=Accepted)
    async def checkpoint_ready(request: Request) -> Response:
        request.state.log["webhook_id"] = request.headers.get("webhook-id", "")[:100]
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        headers = dict(request.headers)
        if why := _unsigned(headers):
            return refuse(request, 401, "signature", f"webhook signature refused: {why}")
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:  # not a signature problem: the sender encoded the message wrongly
            return refuse(request, 422, "body", f"body: not UTF-8 (byte {exc.start}); send the JSON message as UTF-8")
        if why := _verify(secrets, text, headers):
            return refuse(request, 401, "signature", f"webhook signature refused: {why}")
        try:
            msg = CheckpointReady.model_validate_json(text)
        except ValidationError as exc:
            return refuse(request, 422, "body", _field_errors(exc))
        if why := msg.outside_roots(roots):
            return refuse(request, 422, "roots", why)
        if refusal := await _callback_refusal(msg.callback_url, allow_private):
            return refuse(request, *refusal)
        request.state.log |= {"run_id": msg.run_id[:100], "step": msg.step}
        try:
            flow_run_id, duplicate = await api.start(msg)
        except Unavailable as exc:
            return refuse(request, 503, "unavailable", f"{exc}; retry later, nothing was lost")
        except ValueError as exc:
            return refuse(request, 422, "parameters", str(exc))
        outcome = "duplicate" if duplicate else "accepted"
        deliveries.labels(outcome, "").inc()
        request.state.log |= {"outcome": outcome, "flow_run_id": flow_run_id}
        out = Accepted(flow_run_id=flow_run_id, deployment=api.deployment, duplicate=duplicate)
        return _json(202, out.model_dump())

    @app.get("/v1/checkpoints/{flow_run_id}", response_model=AuditStatus)
    async def checkpoint_status(flow_run_id: str, request: Request) -> Response:
        """Signed like a delivery (over an empty body): figures and report locations are not public."""
        if why := _verify(secrets, "", dict(request.headers)):
            return _json(401, {"detail": f"webhook signature refused: {why}"})
        try:
            uuid.UUID(flow_run_id)
        except ValueError:
            return _json(422, {"detail": "flow_run_id: not a UUID"})
        try:
            fr = await api.flow_run(flow_run_id)
        except Unavailable as exc:
            return _json(503, {"detail": f"{exc}; retry later"}, retry=True)
        if fr is None:
            return _json(404, {"detail": f"no flow run {flow_run_id}"})
        state = (fr.get("state") or {}).get("type", "UNKNOWN")
        out = AuditStatus(flow_run_id=flow_run_id, state=state, audit_id=fr.get("name"))
        if state in FINAL:
            out = _with_record(out, (fr.get("state") or {}).get("message"))
        return _json(200, out.model_dump())

    @app.get("/v1/schema")
    async def schema() -> Response:
        return _json(200, CheckpointReady.model_json_schema())

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ok = await api.healthy()
        return _json(200 if ok else 503, {"prefect": "ok" if ok else "unreachable"}, retry=not ok)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def _with_record(out: AuditStatus, message: str | None) -> AuditStatus:
    """The finished audit's record from the store: its status, report and headline figures."""
    from microscope import audits
    from microscope.errors import InputError
    from microscope.result_callback import gate_of
    from microscope.store import open_store

    try:
        rec = audits.load(open_store(None), out.audit_id or "")
    except (InputError, OSError) as exc:
        return out.model_copy(update={"error": message or f"no audit record yet ({exc})"})
    return out.model_copy(
        update={
            "status": rec.status.value,
            "report": rec.report_uri,
            "figures": audits.headline(rec),
            "gate": gate_of(rec),
            "error": rec.error,
        }
    )


async def _callback_refusal(url: str | None, allow_private: bool) -> tuple[int, str, str] | None:
    """(status, reason, detail) when `url` must not be called back (422) or its host cannot be resolved now
    (503: the sender retries); None when it may."""
    if url is None:
        return None
    try:
        async with asyncio.timeout(DNS_TIMEOUT_S):
            await asyncio.to_thread(callback_target, url, allow_private)
    except CallbackRefused as exc:
        return 422, "callback", f"callback_url: {exc}"
    except (CallbackUnresolved, TimeoutError) as exc:
        why = str(exc) or f"DNS did not answer within {DNS_TIMEOUT_S:g} s"
        return 503, "unavailable", f"callback_url: {why}; retry later, nothing was lost"
    return None


async def _discard(chunks: AsyncIterator[bytes], seen: int) -> bool:
    """Read and drop the rest of a refused body; True when it ended within DRAIN_MAX_BYTES and DRAIN_MAX_S."""
    try:
        async with asyncio.timeout(DRAIN_MAX_S):
            async for chunk in chunks:
                seen += len(chunk)
                if seen > DRAIN_MAX_BYTES:
                    return False
    except (TimeoutError, ClientDisconnect):
        return False
    return True


def _json(status: int, body: dict[str, Any], retry: bool = False) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Retry-After": str(RETRY_AFTER_S)} if retry else None)


def serve(host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the receiver on uvicorn's h11 protocol, guarded (deployments/webhook_transport.py); the access log is ours: one
    JSON line per request. A port in use is a ValueError (the CLI's exit 2), not uvicorn's exit 3."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app()
    sock = listen(host, port)
    protocol = guarded_protocol(get_settings().webhook_read_timeout_s)
    config = uvicorn.Config(
        app, http=protocol, h11_max_incomplete_event_size=MAX_HEADER_BYTES, access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run(sockets=[sock])
