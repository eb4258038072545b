"""The webhook receiver's transport, below the app: the socket it listens on (a port in use is one line,
not uvicorn's exit 3), and uvicorn's h11 protocol guarded so that anything a sender sends gets an answer,
never a TCP reset or a connection held open: headers over 16 KiB get 431, headers not complete within the
read timeout get 408, idle connections are closed.
"""

from __future__ import annotations

import asyncio
import errno
import http
import json
import logging
import re
import socket

log = logging.getLogger("microscope.webhook")

MAX_HEADER_BYTES = 16 * 1024  # request line and headers: a delivery's are a few hundred bytes
LINGER_S = 2.0  # after a refusal below the app, what the client still sends is read and dropped this long


def listen(host: str, port: int) -> socket.socket:
    """A socket bound as uvicorn binds it (it listens once serving), or a one-line ValueError saying what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use; pick another with --port") from None
        raise ValueError(
            f"cannot listen on {host} port {port} ({exc.strerror}); pick another --host or --port"
        ) from None
    return sock


_HEADERS_END = re.compile(rb"\n\r?\n")  # h11 accepts bare LF line ends too


def _headers_too_large(buffered: bytes, data: bytes) -> bool:
    """Whether a request's line and headers, of which `buffered` came before `data`, exceed MAX_HEADER_BYTES."""
    end = _HEADERS_END.search(buffered + data[: MAX_HEADER_BYTES + 2])
    return (end.end() if end else len(buffered) + len(data)) > MAX_HEADER_BYTES


def guarded_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, guarded below the app: a request's line and headers over MAX_HEADER_BYTES get
    431, and headers not complete `read_timeout_s` after the connection (or the previous response) get 408,
    so a client cannot hold connections open with partial headers. Both answers are followed by a lingering
    close (the rest of what the client sends is read and dropped), since closing with unread bytes makes the
    kernel send a reset that destroys the answer."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _lingering = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return
            if self.conn.their_state is h11.IDLE and _headers_too_large(self.conn.trailing_data[0], data):
                detail = (
                    f"request line and headers over {MAX_HEADER_BYTES} bytes; send one webhook-signature per secret"
                )
                self._refuse(431, detail, "headers_too_large")
                return
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # h11 could not parse the request
            self._refuse(400, "not an HTTP/1.1 request; send the delivery as HTTP/1.1", "bad_request")

        def _await_headers(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(read_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # a request is in: the app bounds its body
            if not self.conn.trailing_data[0]:
                self.transport.close()  # idle, nothing half-sent: nothing to answer
                return
            detail = f"request headers not received within {read_timeout_s:g} s; send them at once"
            self._refuse(408, detail, "slow_headers")

        def _refuse(self, status: int, detail: str, reason: str) -> None:
            body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
            head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            self.transport.write(head.encode() + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer, then FIN: the client can read it while still sending
            self._lingering = True
            if self._timer is not None:
                self._timer.cancel()
            self.loop.call_later(LINGER_S, self.transport.close)
            line = {"method": None, "path": None, "status": status, "client": self.client[0] if self.client else None}
            log.info(json.dumps(line | {"outcome": "refused", "reason": reason}, separators=(",", ":")))

    return GuardedH11Protocol
