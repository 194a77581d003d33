"""Inbound connections of a `ccproxy serve` worker: slow or silent clients cannot hold it.

The proxy's hostname is printed in every email (pixels, consent links), so anyone can open
thousands of connections that never finish their headers (slowloris). gunicorn's gevent
worker reads a request's headers under its keep-alive timeout (75 s) and stops accepting
once `worker_connections` are open, so a few thousand such sockets would stop every answer
for over a minute. This worker keeps three clocks apart, per connection:

- from connecting, or from the first byte of a later request, the headers must arrive
  within `header_timeout`; the body then has `header_timeout` again;
- between requests, an idle keep-alive connection may wait `keepalive_timeout` (longer than
  load balancers' idle timeouts, so they never reuse a socket we closed);
- past `max_connections`, the longest-idle connection is closed first, then the one that
  has been sending its headers the longest. A connection whose request is being answered
  is never closed.

Requests gunicorn cannot parse (a URL over its 4 KB request line: 414; a malformed request
line: 400; too many headers: 431) are answered in the proxy's JSON error shape, not
gunicorn's HTML page.

All of this is per worker process (each guards the sockets it accepted); a timed-out or
shed connection looks to gunicorn like a client that hung up, so it is closed quietly.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WAITING, IDLE, ACTIVE = "waiting", "idle", "active"
# gunicorn answers requests it cannot parse itself, before the app sees them; these are its
# statuses, in the proxy's error shape. The messages are fixed: gunicorn's own quote the
# request, which may carry a credential.
PROTOCOL_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1"),
    403: ("forbidden", "the request was refused"),
    414: ("uri_too_long", "the request line (method and URL) is too long: send long values "
                          "in a POST body"),
    417: ("expectation_failed", "the Expect header cannot be met"),
    431: ("headers_too_large", "the request's headers are too many or too large"),
    500: ("internal_error", "the request could not be handled"),
    501: ("not_implemented", "the request's transfer coding is not supported"),
}


class ConnectionGuard:
    """The connections of one worker, by phase, oldest first."""

    def __init__(self, header_timeout: float, keepalive_timeout: float, max_connections: int,
                 send_timeout: float = 30.0):
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        self.phases: dict[str, OrderedDict[GuardedSocket, None]] = {
            WAITING: OrderedDict(), IDLE: OrderedDict(), ACTIVE: OrderedDict()}
        self.shed_count = 0
        self.timed_out = 0
        self.closing = False  # shutting down: no connection waits for another request

    def __len__(self) -> int:
        return sum(len(conns) for conns in self.phases.values())

    def admit(self, conn: GuardedSocket) -> None:
        """A new connection: its first request's headers are due within header_timeout."""
        self.move(conn, WAITING, self.header_timeout)
        while len(self) > self.max_connections and self._shed_one():
            pass

    def move(self, conn: GuardedSocket, phase: str, budget: float) -> None:
        if conn.phase:
            self.phases[conn.phase].pop(conn, None)
        conn.phase, conn.deadline = phase, time.monotonic() + budget
        self.phases[phase][conn] = None

    def leave(self, conn: GuardedSocket) -> None:
        if conn.phase:
            self.phases[conn.phase].pop(conn, None)
        conn.phase = ""

    def shed_idle(self) -> int:
        """Shutting down: close every connection not being answered, so the worker stops as
        soon as its requests and deliveries in flight are done (not after keep-alive ends)."""
        self.closing = True
        shed = 0
        for phase in (IDLE, WAITING):
            while self.phases[phase]:
                conn, _ = self.phases[phase].popitem(last=False)
                conn.phase = ""
                conn.close_now()
                shed += 1
        return shed

    def _shed_one(self) -> bool:
        for phase in (IDLE, WAITING):
            if self.phases[phase]:
                conn, _ = self.phases[phase].popitem(last=False)
                conn.phase = ""
                conn.close_now()
                self.shed_count += 1
                return True
        return False  # every connection is being answered: accept no more (gunicorn's pool)


class GuardedSocket:
    """A client socket whose reads end (as if the client hung up) at the phase's deadline."""

    __slots__ = ("_sock", "guard", "phase", "deadline", "requests")

    def __init__(self, sock: socket.socket, guard: ConnectionGuard):
        self._sock = sock
        self.guard = guard
        self.phase = ""
        self.deadline = 0.0
        self.requests = 0
        guard.admit(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, size: int, *flags: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.guard.timed_out += 1
            return b""
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(size, *flags)
        except TimeoutError:
            self.guard.timed_out += 1
            return b""
        except OSError:
            if self.deadline == 0.0:  # shed: gevent wakes the blocked read with an error
                return b""
            raise
        if data and self.phase == IDLE:
            # The next request has begun: its headers are due within header_timeout.
            self.guard.move(self, WAITING, self.guard.header_timeout)
        return data

    def sendall(self, data: bytes, *flags: int) -> None:
        # A client that stops reading its answer cannot hold the connection forever.
        self._sock.settimeout(self.guard.send_timeout)
        self._sock.sendall(data, *flags)

    def send(self, data: bytes, *flags: int) -> int:
        self._sock.settimeout(self.guard.send_timeout)
        return self._sock.send(data, *flags)

    def close_now(self) -> None:
        """Shed: wake the reader blocked on this socket with an end of stream."""
        self.deadline = 0.0
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @contextmanager
    def reading_request(self) -> Iterator[None]:
        """Around gunicorn's read of one request line and headers."""
        if self.requests:
            self.guard.move(self, IDLE, self.guard.keepalive_timeout)
            if self.guard.closing:  # answered while the worker was told to stop: no more
                self.close_now()
        try:
            yield
        finally:
            if self.phase:
                self.requests += 1
                self.guard.move(self, ACTIVE, self.guard.header_timeout)  # the body's budget


def protocol_error(status: int, reason: str) -> bytes:
    """A whole HTTP answer for a request gunicorn could not parse (the connection then closes)."""
    from .errors import ProxyError
    from .responses import JSON_TYPE, json_bytes

    code, message = PROTOCOL_ERRORS.get(status, ("bad_request", "the request could not be parsed"))
    body = json_bytes(ProxyError(message, code=code).body())
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {JSON_TYPE}\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _write_json_error(sock: Any, status_int: int, reason: str, _mesg: str) -> None:
    """gunicorn's `util.write_error`, in the proxy's JSON shape instead of an HTML page."""
    from gunicorn import util

    util.write_nonblock(sock, protocol_error(int(status_int), reason))


def guarded_worker_class(header_timeout: float, keepalive_timeout: float, max_connections: int) -> type:
    """gunicorn's gevent worker with the guard above (imported here: gevent is loaded only
    where gunicorn loads its worker class)."""
    from gevent import getcurrent
    from gunicorn.workers.ggevent import GeventWorker

    class GuardedGeventWorker(GeventWorker):
        def init_process(self) -> None:
            self.guard = ConnectionGuard(header_timeout, keepalive_timeout, max_connections)
            self.reading: dict[Any, GuardedSocket] = {}
            # gunicorn's handle_error classifies a malformed request (400, 414, 431...) and
            # writes it through this one function; in this worker process, it writes JSON.
            from gunicorn import util

            util.write_error = _write_json_error
            super().init_process()

        def handle(self, listener: Any, client: Any, addr: Any) -> None:
            conn = GuardedSocket(client, self.guard)
            greenlet = getcurrent()
            self.reading[greenlet] = conn
            try:
                super().handle(listener, conn, addr)
            finally:
                self.reading.pop(greenlet, None)
                self.guard.leave(conn)

        def timeout_ctx(self) -> Any:
            return self.reading[getcurrent()].reading_request()

    return GuardedGeventWorker
