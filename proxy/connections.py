"""Inbound connections of a `ccproxy serve` worker: slow or silent clients cannot hold it.

The proxy's hostname is printed in every email (pixels, consent links), so anyone can open
thousands of connections that never finish their headers (slowloris), trickle a request
body a byte a second, or never read their answers. gunicorn's gevent worker reads headers
under its keep-alive timeout (75 s), lets the application read the body at the client's
pace, blocks a send for as long as the socket's timeout, and stops accepting once
`worker_connections` are open; so a few thousand such sockets would stop every answer.

This worker gives each connection one phase at a time, each on its own clock:

- waiting: from connecting, or from the first byte of a later request, the headers must
  arrive within `header_timeout`;
- body: the whole request body must arrive within `body_timeout`. The worker reads it
  (up to `max_body` + 1 bytes) before the application runs, so a slow client never holds
  a request's deadline or a greenlet inside the app; late, it is answered a JSON 408
  `body_timeout` (if anything can still be written) and closed;
- active: the request is being answered (the app runs, maybe waiting on an upstream): no
  clock of ours, never shed;
- send: the answer must be taken by the client within `send_timeout` from its first byte;
  a stuck send is closed. The next request (pipelined or not) is read only once the
  answers before it are written and taken by the client (the kernel has transmitted all of
  them: the client's receive window is open; asked every UNCHECKED_BYTES or
  UNCHECKED_ANSWERS), so a client that pipelines requests and reads nothing costs at most
  its receive buffer of answers and that much more, not megabytes of them;
- idle: between requests a keep-alive connection may wait `keepalive_timeout` (longer than
  load balancers' idle timeouts, so they never reuse a socket we closed).

Past `max_connections`, the longest-idle connection is closed first; then, of those whose
pace the client decides (waiting, body, send), the one that entered its phase first: the
slowest, never the newcomer while an older one is left. An active one never is.

Requests gunicorn cannot parse (a URL over its 4 KB request line: 414; a malformed request
line: 400; too many headers: 431) are answered in the proxy's JSON error shape, not
gunicorn's HTML page.

All of this is per worker process (each guards the sockets it accepted); a timed-out or
shed connection looks to gunicorn like a client that hung up, so it is closed quietly.
The guard counts closures by reason (`closed`), copied into `ccproxy_connections_closed_total`
and the open connections by phase into `ccproxy_connections` (proxy/observability.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, BodyTimeout, BodyTooLarge, ProxyError

if TYPE_CHECKING:
    from .config import Settings

WAITING, IDLE, BODY, ACTIVE, SEND = "waiting", "idle", "body", "active", "send"
PHASES = (WAITING, IDLE, BODY, ACTIVE, SEND)
# The phases whose length the client decides: past the cap, the oldest of them is shed.
_CLIENT_PACED = (WAITING, BODY, SEND)
# The clock that ran out, by phase (an active request reads only the rest of a body over
# CCPROXY_MAX_BODY, if the app asks for it: the body's clock).
TIMEOUT_REASONS = {WAITING: "header_timeout", IDLE: "keepalive_timeout", BODY: "body_timeout",
                   ACTIVE: "body_timeout", SEND: "send_timeout"}
# A head in more than MAX_HEAD_READS pieces is closed like one past its clock ("header_trickle"):
# gunicorn's parser copies its whole buffer on every read, so a head trickled a byte per read
# cost seconds of a worker's CPU (quadratic). Real clients send a head in a few segments; 256
# reads of even one 1,448-byte segment each cover heads far past any header a caller sends.
MAX_HEAD_READS = 256
HEADER_TRICKLE = "header_trickle"
# A connection whose last this many requests all went to gunicorn stays with gunicorn.
MAX_HANDED_IN_A_ROW = 8
CLOSE_REASONS = (*TIMEOUT_REASONS.values(), HEADER_TRICKLE,
                 *(f"shed_{phase}" for phase in (IDLE, *_CLIENT_PACED)), "shutdown")
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
    """The connections of one worker, by phase, each phase's oldest first."""

    def __init__(self, header_timeout: float, keepalive_timeout: float, max_connections: int,
                 body_timeout: float = 10.0, send_timeout: float = 5.0):
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.phases: dict[str, OrderedDict[GuardedSocket, None]] = {
            phase: OrderedDict() for phase in PHASES}
        self.closed: Counter[str] = Counter()  # by reason: a clock that ran out, or shed_<phase>
        self.handed_over: Counter[str] = Counter()  # by the fast lane to gunicorn, by reason
        self.closing = False  # shutting down: no connection waits for another request

    def __len__(self) -> int:
        return sum(len(conns) for conns in self.phases.values())

    @property
    def shed_count(self) -> int:
        return sum(n for reason, n in self.closed.items() if reason.startswith("shed_"))

    @property
    def timed_out(self) -> int:
        return sum(n for reason, n in self.closed.items() if reason.endswith("_timeout"))

    def open_by_phase(self) -> dict[str, int]:
        return {phase: len(conns) for phase, conns in self.phases.items()}

    def admit(self, conn: GuardedSocket) -> None:
        """A new connection: its first request's headers are due within header_timeout."""
        self.move(conn, WAITING, self.header_timeout)
        while len(self) > self.max_connections and self._shed_one():
            pass

    def move(self, conn: GuardedSocket, phase: str, budget: float) -> None:
        if conn.phase:
            self.phases[conn.phase].pop(conn, None)
        now = time.monotonic()
        conn.phase, conn.since, conn.deadline = phase, now, now + budget
        if phase == WAITING:
            conn.head_reads = 0
        self.phases[phase][conn] = None

    def leave(self, conn: GuardedSocket) -> None:
        if conn.phase:
            self.phases[conn.phase].pop(conn, None)
        conn.phase = ""

    def shed(self, conn: GuardedSocket, reason: str) -> None:
        self.closed[reason] += 1
        self.leave(conn)
        conn.close_now()

    def shed_idle(self) -> int:
        """Shutting down: close every connection not being answered, so the worker stops as
        soon as its requests and deliveries in flight are done (not after keep-alive ends)."""
        self.closing = True
        victims = [*self.phases[IDLE], *self.phases[WAITING]]
        for conn in victims:
            self.shed(conn, "shutdown")
        return len(victims)

    def _shed_one(self) -> bool:
        victim = self._victim()
        if victim is None:
            return False  # every connection is being answered: accept no more (gunicorn's pool)
        self.shed(victim, f"shed_{victim.phase}")
        return True

    def _victim(self) -> GuardedSocket | None:
        """The longest-idle connection; else the one that entered a client-paced phase first."""
        if self.phases[IDLE]:
            return next(iter(self.phases[IDLE]))
        heads = [next(iter(self.phases[phase])) for phase in _CLIENT_PACED if self.phases[phase]]
        return min(heads, key=lambda conn: conn.since, default=None)


def _quiet_hangup(message: str) -> BrokenPipeError:
    # gunicorn logs EPIPE at debug level, as a client that went away; anything else it logs
    # with a traceback.
    return BrokenPipeError(errno.EPIPE, message)


# Linux ioctl: bytes written to a TCP socket that the kernel has not transmitted yet (the
# client's receive window is closed: it does not read). Unlike SIOCOUTQ it leaves out bytes
# in flight, so a client across a WAN is not waited for while its ACK travels.
SIOCOUTQNSD = 0x894B
# Answer bytes, and answers, a connection may send before the kernel is asked whether its
# client took them (GuardedSocket.answer_taken): about ten cache hits' worth. The count of
# answers bounds the ones that are mostly work, few bytes (HEAD, small errors).
UNCHECKED_BYTES = 32 * 1024
UNCHECKED_ANSWERS = 16


def _unsent(sock: socket.socket) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # not TCP, or not Linux: nothing known to wait for
        return 0


# Linux TCP states (TCP_INFO's first byte) in which the client may still read what was sent.
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8


def _client_gone(sock: socket.socket) -> bool:
    """Whether the connection is over (the client reset or closed it): the kernel keeps
    counting its unsent bytes, which no one will ever take."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (OSError, AttributeError, IndexError):  # not TCP, or not Linux: not known to be gone
        return False
    return state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT)


class GuardedSocket:
    """A client socket whose reads end (as if the client hung up) at the phase's deadline,
    and whose sends of an answer fail (as if the client hung up) at the send deadline."""

    __slots__ = ("_sock", "guard", "phase", "since", "deadline", "requests", "expired", "pending",
                 "resumed", "head_reads", "taken_back", "handed_in_a_row", "unchecked",
                 "unchecked_answers")

    def __init__(self, sock: socket.socket, guard: ConnectionGuard):
        self._sock = sock
        self.guard = guard
        self.phase = ""
        self.since = self.deadline = 0.0
        self.requests = 0
        self.expired = ""  # the clock that ran out, if one did
        # Handed over by the fast lane (proxy/fast_lane.py): bytes it read, which gunicorn's
        # parser reads first; and that the request they begin is already on its clock.
        self.pending = b""
        self.resumed = False
        self.head_reads = 0  # reads of the head being waited for (MAX_HEAD_READS)
        # Back to the fast lane after gunicorn's answer: the bytes gunicorn read past it (None:
        # the connection stays with gunicorn, or is over).
        self.taken_back: bytes | None = None
        self.handed_in_a_row = 0  # requests handed to gunicorn since the lane last answered one
        # Bytes and answers sent since the client was last seen to have taken them all.
        self.unchecked = self.unchecked_answers = 0
        guard.admit(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def close(self) -> None:
        """gunicorn closes the socket when its loop ends: not when the lane takes it back."""
        if self.taken_back is None:
            self._sock.close()

    def hand_over(self, read: bytes) -> None:
        """The fast lane stops here: gunicorn's parser starts with `read`, on the clock the
        request's head is already on (a slow head gets no second header timeout)."""
        self.pending = read + self.pending  # before any handed over earlier, still unread
        self.resumed = True
        self.handed_in_a_row += 1

    def recv(self, size: int, *flags: int) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:size], self.pending[size:]
            return data
        left = self.deadline - time.monotonic()
        if left <= 0 or not self.phase:
            return self._expire()
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(size, *flags)
        except TimeoutError:
            return self._expire()
        except OSError:
            if not self.phase:  # shed: gevent wakes the blocked read with an error
                return b""
            raise
        if data and self.phase == IDLE:
            # The next request has begun: its headers are due within header_timeout.
            self.guard.move(self, WAITING, self.guard.header_timeout)
        if self.phase == WAITING:
            self.head_reads += 1
            if self.head_reads > MAX_HEAD_READS:
                return self._expire(HEADER_TRICKLE)
        return data

    def _expire(self, reason: str = "") -> bytes:
        """The phase's clock ran out (or the head came in too many pieces): count it once;
        reads see the end of the stream."""
        if self.phase and not self.expired:
            self.expired = reason or TIMEOUT_REASONS[self.phase]
            self.guard.closed[self.expired] += 1
        if reason:
            self.deadline = 0.0  # every later read sees the end too
        return b""

    def _send_time_left(self) -> float:
        """An answer's first byte starts the send clock; its whole must go within it."""
        if not self.phase:
            raise _quiet_hangup("connection shed")
        if self.phase != SEND:
            self.guard.move(self, SEND, self.guard.send_timeout)
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._expire()
            raise _quiet_hangup("the client did not take its answer in time")
        return left

    def sendall(self, data: bytes, *flags: int) -> None:
        self._sock.settimeout(self._send_time_left())
        try:
            # One send first: an answer of a few KB goes whole into the socket buffer, and
            # gevent's sendall asks the kernel for SO_SNDBUF on every call (a syscall: 6% of
            # a cache hit's CPU). The rest, if any, within what is left of the send clock.
            self.unchecked += len(data)
            sent = self._sock.send(data, *flags)
            if sent < len(data):
                self._sock.settimeout(self._send_time_left())
                self._sock.sendall(memoryview(data)[sent:], *flags)
        except OSError as exc:
            raise self._send_failure(exc) from None

    def send(self, data: bytes, *flags: int) -> int:
        self._sock.settimeout(self._send_time_left())
        try:
            sent = self._sock.send(data, *flags)
        except OSError as exc:
            raise self._send_failure(exc) from None
        self.unchecked += sent
        return sent

    def _send_failure(self, exc: OSError) -> OSError:
        if isinstance(exc, TimeoutError):
            self._expire()
            return _quiet_hangup("the client did not take its answer in time")
        return _quiet_hangup("connection shed") if not self.phase else exc

    def close_now(self) -> None:
        """Shed: wake the reader or sender blocked on this socket."""
        self.deadline = 0.0
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def answer_taken(self) -> bool:
        """Wait (on the send clock) until the client has taken the answers sent so far: the
        kernel has transmitted all of them. A client that pipelines requests and reads nothing
        would otherwise have the worker render answer after answer into socket buffers
        (megabytes each), starving every other client of the worker's CPU. Only such a
        client waits: a reading one has an open window, so nothing is left unsent.

        Asked of the kernel only once UNCHECKED_BYTES or UNCHECKED_ANSWERS were sent since
        it last said all was taken (a syscall per request was 5% of a cache hit's CPU): a
        client that reads nothing gets that much more than its receive buffer holds, then
        waits as before."""
        self.unchecked_answers += 1
        if self.unchecked < UNCHECKED_BYTES and self.unchecked_answers < UNCHECKED_ANSWERS:
            return True
        delay = 0.001
        while _unsent(self._sock) > 0:
            if _client_gone(self._sock):  # reset with the answer unread: nothing to wait for
                return False
            left = self.deadline - time.monotonic()
            if not self.phase or left <= 0:
                self._expire()
                return False
            time.sleep(min(delay, left))  # gevent's sleep in a worker
            delay = min(2 * delay, 0.05)
        self.unchecked = self.unchecked_answers = 0
        return True

    def before_request(self, begun: bool = False) -> bool:
        """Before reading a request line and headers: the previous answer must be written
        whole and taken by the client. False: the connection is over (the next read sees
        the end of the stream). `begun`: part of the next head already came with the last
        one, so it is due within header_timeout, not keepalive_timeout."""
        if self.resumed:  # the fast lane did this for the request gunicorn now reads
            self.resumed = False
        elif self.requests:
            if not self.answer_taken():
                self.guard.leave(self)
                self.close_now()
            elif begun:
                self.guard.move(self, WAITING, self.guard.header_timeout)
            else:
                self.guard.move(self, IDLE, self.guard.keepalive_timeout)
            if self.guard.closing and self.phase:  # answered while the worker was told to stop
                self.guard.shed(self, "shutdown")
        return bool(self.phase)

    def start_answer(self) -> None:
        """A request without a body has been read whole: it is being answered."""
        self.requests += 1
        self.handed_in_a_row = 0
        self.guard.move(self, ACTIVE, self.guard.body_timeout)

    @contextmanager
    def reading_request(self) -> Iterator[None]:
        """Around gunicorn's read of one request line and headers."""
        self.before_request()
        try:
            yield
        finally:
            if self.phase:
                self.requests += 1
                self.guard.move(self, BODY, self.guard.body_timeout)

    def take_body(self, req: Any, max_body: int, body_class: type) -> bool:
        """Read the request's body (up to `max_body` + 1 bytes) under the body clock, before
        the app runs; then the request is active. False: the connection must close (the
        client is gone, or was answered 408, 413 or 400 here)."""
        headers = dict(req.headers)  # gunicorn refused repeated or conflicting length headers
        length = headers.get("CONTENT-LENGTH")
        if "TRANSFER-ENCODING" not in headers:
            size = int(length or 0)
            if size > max_body:
                # The app refuses it by its length (413) without reading it; nor does gunicorn
                # drain it for a next request at the client's pace: the connection closes.
                req.force_close()
            if size == 0 or size > max_body:
                self.guard.move(self, ACTIVE, self.guard.body_timeout)
                return True
        from gunicorn.http.errors import NoMoreData, ParseException

        try:
            # gunicorn would send this when the app starts; the client waits for it to send the body.
            if getattr(req, "_expected_100_continue", False):
                req._expected_100_continue = False
                self._sock.settimeout(max(0.001, self.deadline - time.monotonic()))
                self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            data = req.body.read(max_body + 1)
        except (NoMoreData, OSError):
            data = None
        except ParseException:
            if self.phase and not self.expired:
                return self._answer_and_close(BadRequest("malformed chunked request body",
                                                         code="invalid_body"))
            data = None
        if self.expired:
            return self._answer_and_close(BodyTimeout(self.guard.body_timeout))
        if data is None or not self.phase:
            return False  # the client hung up, or the connection was shed for a newer one
        if length is not None and len(data) < int(length):
            return self._answer_and_close(BadRequest(
                "the request body ended before its Content-Length", code="invalid_body"))
        if len(data) > max_body:  # chunked, over the limit: the app would not see it whole
            return self._answer_and_close(BodyTooLarge(max_body))
        req.body = body_class(_Prefetched(data, req.body))
        self.guard.move(self, ACTIVE, self.guard.body_timeout)
        return True

    def _answer_and_close(self, error: ProxyError) -> bool:
        """A JSON error written by the server itself (the app never saw the request), with
        Connection: close; at most send_timeout, and nothing if the client is gone."""
        from .dispatch import http_answer, status_line
        from .responses import JSON_TYPE, json_bytes

        status, extra, body = http_answer(error)
        payload = json_bytes(body)
        head = [f"HTTP/1.1 {status_line(status)}", f"Content-Type: {JSON_TYPE}",
                f"Content-Length: {len(payload)}", "Connection: close",
                "X-Content-Type-Options: nosniff", *(f"{name}: {value}" for name, value in extra.items())]
        try:
            self.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:
            pass
        return False


class _Prefetched:
    """A body reader for gunicorn's Body: the bytes read under the body clock, then whatever
    the client sends past CCPROXY_MAX_BODY (read only if the app asks for it)."""

    def __init__(self, data: bytes, rest: Any):
        self.data = data
        self.rest = rest

    def read(self, size: int) -> bytes:
        if self.data:
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk
        return self.rest.read(size)


def protocol_error(status: int, reason: str) -> bytes:
    """A whole HTTP answer for a request gunicorn could not parse (the connection then closes)."""
    from .errors import ProxyError
    from .responses import JSON_TYPE, json_bytes

    code, message = PROTOCOL_ERRORS.get(status, ("bad_request", "the request could not be parsed"))
    body = json_bytes(ProxyError(message, code=code).body())
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {JSON_TYPE}\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class WithheldRequestText(logging.Filter):
    """gunicorn's own log lines about a request it could not handle quote the request line or
    header (`Invalid HTTP Header: 'Authorization Bearer <key>'`) and the URI with its query
    (customer ids): the proxy never logs either. The line keeps what happened and who sent it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Invalid request from ip="):
            record.msg, record.args = message.partition(": ")[0] + " (its text is not logged)", None
        elif message.startswith("Error handling request") and record.args:
            record.msg, record.args = "Error handling request (its URI is not logged)", None
        return True


def _write_json_error(sock: Any, status_int: int, reason: str, _mesg: str) -> None:
    """gunicorn's `util.write_error`, in the proxy's JSON shape instead of an HTML page."""
    from gunicorn import util

    util.write_nonblock(sock, protocol_error(int(status_int), reason))


def guarded_worker_class(settings: Settings) -> type:
    """gunicorn's gevent worker with the guard above (imported here: gevent is loaded only
    where gunicorn loads its worker class)."""
    from gevent import getcurrent
    from gunicorn import SERVER, util
    from gunicorn.http.body import Body
    from gunicorn.http.wsgi import base_environ
    from gunicorn.workers.ggevent import GeventWorker

    from .fast_lane import FastLane

    class GuardedGeventWorker(GeventWorker):
        def init_process(self) -> None:
            self.guard = ConnectionGuard(settings.header_timeout, settings.keepalive_timeout,
                                         settings.max_connections, settings.body_timeout,
                                         settings.send_timeout)
            self.reading: dict[Any, GuardedSocket] = {}
            # gunicorn's handle_error classifies a malformed request (400, 414, 431...) and
            # writes it through this one function; in this worker process, it writes JSON.
            util.write_error = _write_json_error
            logging.getLogger("gunicorn.error").addFilter(WithheldRequestText())
            super().init_process()

        def load_wsgi(self) -> None:
            super().load_wsgi()
            self.lane: FastLane | None = None
            services = getattr(self.wsgi, "extensions", {}).get("ccproxy")
            if services is not None:  # its metrics copy the guard's counts
                services.connections = self.guard
                # The lane speaks plain HTTP/1.1 from the first byte (no PROXY protocol header,
                # which gunicorn reads only on a connection's first request).
                if settings.fast_lane and getattr(self.cfg, "proxy_protocol", "off") in ("off", False, None):
                    self.lane = FastLane(self.wsgi, services.endpoints, self.cfg, self._count_request,
                                         self.after_answer, SERVER, base_environ(self.cfg))

        def after_answer(self) -> None:
            """After each answer, the lane's or gunicorn's (fair_worker_class yields here)."""

        def _count_request(self) -> bool:
            """gunicorn's count for a request the fast lane answers: False once the worker
            stops serving (told to stop, or max_requests reached)."""
            worker: Any = self  # gunicorn's attributes carry no types
            worker.nr += 1
            if worker.nr >= worker.max_requests and worker.alive:
                worker.log.info("Autorestarting worker after current request.")
                worker.alive = False
            return bool(worker.alive)

        def handle(self, listener: Any, client: Any, addr: Any) -> None:
            conn = GuardedSocket(client, self.guard)
            greenlet = getcurrent()
            self.reading[greenlet] = conn
            try:
                read = b""
                while True:
                    if self.lane is not None:
                        client.setblocking(1)  # as gunicorn's gevent worker does
                        handed = self._fast_lane(conn, listener, addr, read)
                        if handed is None:
                            util.close(client)
                            return
                        conn.hand_over(handed)
                    super().handle(listener, conn, addr)
                    if conn.taken_back is None:
                        return
                    read, conn.taken_back = conn.taken_back, None
            finally:
                self.reading.pop(greenlet, None)
                self.guard.leave(conn)

        def _fast_lane(self, conn: GuardedSocket, listener: Any, addr: Any, read: bytes) -> bytes | None:
            """What gunicorn must take over (None: the connection is over), with gunicorn's
            handling of a client that went away and of an answer that failed."""
            assert self.lane is not None
            try:
                return self.lane.serve(conn, addr, listener.getsockname(), read)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    self.log.exception("Socket error processing request.")
            except Exception:
                self.log.exception("Error handling request (its URI is not logged)")
                try:
                    conn.sendall(protocol_error(500, "Internal Server Error"))
                except OSError:
                    pass
            return None

        def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
            if not sock.take_body(req, settings.max_body, Body):
                raise StopIteration  # gunicorn's keep-alive loop closes the connection quietly
            super().handle_request(listener_name, req, sock, addr)
            # Answered (the send phase) and kept alive (gunicorn raises StopIteration for a
            # connection that closes; take_body read the body whole): the connection goes back
            # to the fast lane with what gunicorn read past this request, so a preview or a
            # write on a pooled connection does not cost every later data call on it the lane.
            # Not on a connection whose last requests all went to gunicorn (HTTP/1.0
            # keep-alive, say): there the lane would only add a head scan and a copy to each.
            take_buffered = getattr(req.unreader, "take_buffered", None)
            if (self.lane is not None and self.alive and take_buffered is not None and sock.phase == SEND
                    and sock.handed_in_a_row < MAX_HANDED_IN_A_ROW):
                sock.taken_back = take_buffered()
                # gunicorn's loop ends here; GuardedSocket.close keeps the socket open.
                raise StopIteration("back to the fast lane")

        def timeout_ctx(self) -> Any:
            return self.reading[getcurrent()].reading_request()

    return GuardedGeventWorker
