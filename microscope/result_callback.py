"""The audit's result, POSTed to the training job's `callback_url` when the audit ends, signed the same way
as the deliveries (Standard Webhooks, the first of MICROSCOPE_WEBHOOK_SECRET), retried with backoff for
a bounded time. A callback that cannot be delivered is a warning on the audit, never a failed audit.

A callback URL is a place the receiver's sender makes our pods POST to, so it must not reach what only
the pods can reach (a cloud metadata address, the cluster's services, localhost): its host must resolve to
public addresses only, unless MICROSCOPE_CALLBACK_ALLOW_PRIVATE allows others (a laptop, a test). The
receiver checks when the message arrives; every attempt here checks again and connects to the address it
checked, so a DNS answer that changes in between (rebinding) cannot redirect the POST."""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from schemas.records import AuditRecord, StageStatus

from microscope import audits

log = logging.getLogger("microscope.callback")
EVENT = "microscope.audit.finished"


def result_payload(rec: AuditRecord, checkpoint: str, flow_run_id: str | None) -> dict[str, Any]:
    return {
        "event": EVENT,
        "audit_id": rec.audit_id,
        "flow_run_id": flow_run_id,
        "checkpoint": checkpoint,
        "run_id": rec.run_id,
        "step": rec.step,
        "status": rec.status.value,
        "error": rec.error,
        "report": rec.report_uri,
        "figures": audits.headline(rec),
        "gate": gate_of(rec),
    }


def gate_of(rec: AuditRecord) -> dict[str, Any] | None:
    """The gate's verdict (the record's `gate` stage) when the audit has rules; None otherwise."""
    g = rec.stages.get("gate")
    if g is None or g.status == StageStatus.skipped:
        return None
    if g.status == StageStatus.failed:
        return {"verdict": "error", "error": g.error}
    return g.details


def failed_payload(head: dict[str, Any], checkpoint: str, flow_run_id: str | None, error: str) -> dict[str, Any]:
    """An audit refused before it started (a bad config, a missing checkpoint): no record, the reason."""
    base = {"event": EVENT, "flow_run_id": flow_run_id, "checkpoint": checkpoint, **head}
    return base | {"status": "failed", "error": error, "report": None, "figures": {}, "gate": None}


class CallbackRefused(ValueError):
    """A callback URL results must not go to; the text is one line naming the host and why."""


class CallbackUnresolved(Exception):
    """DNS cannot answer for the callback's host now: another attempt may."""


@dataclass(frozen=True)
class CallbackTarget:
    """Where one result POST goes: `url` with its host replaced by the address that was checked, and the
    Host header and TLS server name (`extensions`) that keep the name the URL gave."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def callback_target(url: str, allow_private: bool) -> CallbackTarget:
    """Check `url` (its host resolves to public addresses only, unless `allow_private`) and pin it to the first
    address. CallbackRefused when it must not be called, CallbackUnresolved when DNS cannot answer now."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused(f"{url[:200]!r} is not an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefused(f"{url[:200]!r} has a port that is not a number in 0-65535") from None
    if allow_private:
        return CallbackTarget(url)
    address = public_address(parts.hostname, port)
    if _is_ip(parts.hostname):
        return CallbackTarget(url)  # nothing to resolve again: the URL names the address it was checked as
    return pin(url, address)


def public_address(host: str, port: int) -> str:
    """The first address `host` resolves to, when every one is public; CallbackRefused naming the first that is
    not (a name may resolve to several, and any of them could be the one connected to)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_NAME:
            raise CallbackRefused(f"host {host} does not resolve; send a name the audits can resolve") from None
        raise CallbackUnresolved(f"host {host} could not be resolved now ({exc.strerror})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if kind := _not_public(address):
            where = "" if address == host else f" ({address})"
            raise CallbackRefused(
                f"host {host} is {kind}{where}; results go to public addresses only, unless "
                "MICROSCOPE_CALLBACK_ALLOW_PRIVATE=true on the receiver and the audits"
            )
    return addresses[0]


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _not_public(address: str) -> str | None:
    """What kind of non-public address this is ('a loopback address', ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of it
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip  # ::ffff:127.0.0.1 and 2002:7f00:1:: are 127.0.0.1
    kinds = [
        ("an unspecified address", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
        ("not a public address", not ip.is_global),
    ]
    return next((kind for kind, hit in kinds if hit), None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pin(url: str, address: str) -> CallbackTarget:
    """`url` sent to `address`: the host replaced by it, the Host header and TLS server name keeping the name."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + (f"[{address}]" if ":" in address else address)
    netloc += f":{parts.port}" if parts.port else ""
    sni = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return CallbackTarget(parts._replace(netloc=netloc).geturl(), {"host": hostport}, sni)


def post_result(
    url: str, payload: dict[str, Any], secret: str, give_up_after_s: float = 120.0, allow_private: bool | None = None
) -> str | None:
    """POST `payload` signed; None once a 2xx answers, else why it was given up (one line). allow_private:
    whether the host may be a non-public address (default: MICROSCOPE_CALLBACK_ALLOW_PRIVATE)."""
    import httpx

    from microscope.integrations.notify import new_message_id, signed_headers
    from microscope.settings import get_settings

    if allow_private is None:
        allow_private = get_settings().callback_allow_private
    body = json.dumps(payload, separators=(",", ":"), default=str)
    msg_id = new_message_id()  # one id for every attempt: the receiver can dedupe retries
    deadline = time.monotonic() + give_up_after_s
    delay, why = 0.5, "not sent"
    while True:
        try:
            target = callback_target(url, allow_private)  # each attempt connects to the address it checked
            headers = signed_headers(secret, body, msg_id) | target.headers
            with httpx.Client(timeout=10) as client:
                r = client.post(target.url, content=body, headers=headers, extensions=target.extensions)
            if r.status_code < 300:
                return None
            why = f"{url} answered {r.status_code}"
            if r.status_code < 500 and r.status_code not in (408, 425, 429):
                return why  # the receiver refuses this message: another attempt cannot help
        except CallbackRefused as exc:
            return f"{url} refused: {exc}"
        except CallbackUnresolved as exc:
            why = f"{url} unreachable ({exc})"
        except httpx.HTTPError as exc:
            why = f"{url} unreachable ({type(exc).__name__})"
        if time.monotonic() + delay > deadline:
            return f"{why}; gave up after {give_up_after_s:.0f} s"
        time.sleep(random.uniform(0, delay))  # full jitter
        delay = min(delay * 2, 30.0)
