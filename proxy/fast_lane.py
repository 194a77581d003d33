"""The fast lane of a `ccproxy serve` worker: a plain GET of a data endpoint, answered
without gunicorn's per-request machinery.

Braze's calls are plain GETs on kept-alive connections. gunicorn turns each into a
Request (its parser, header and proxy-trust policies), a full WSGI environ and a Response:
about 60% of a cache hit's CPU, more than the proxy's own work (bench/RESULTS.md, "Fast
lane"). This lane reads a request's head itself and, when the head is a plain GET of a data
endpoint in the strict subset of HTTP/1.1 below, gives the same WSGI app the environ keys the
envelope reads (proxy/middleware.py) and writes the answer with gunicorn's status line and
default headers.

Anything else goes to gunicorn, with the bytes read so far: gunicorn then parses, answers
or refuses it exactly as it did before this lane existed, and a connection it keeps alive
comes back to the lane with what it read past that request (proxy/connections.py).
That covers every request with a body or a framing header (Content-Length,
Transfer-Encoding), Expect, Upgrade, an unknown Connection option, HTTP/1.0, a header name
gunicorn's policy drops or refuses (an underscore), a repeated header, a byte outside the
grammar (obs-fold, obs-text, controls), a path with escapes, a request line or head over
gunicorn's limits, and every path that is not a data endpoint. The lane never answers an
error of its own: a doubt costs speed, never a different answer.

The connection's phases and clocks are the guard's (proxy/connections.py): the lane reads
and sends through the same GuardedSocket, so header, keep-alive and send clocks, the
unread-answer check and shedding apply unchanged. Per worker process, like gunicorn's own
handling.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from gunicorn.util import hop_headers

if TYPE_CHECKING:
    from .connections import GuardedSocket

# RFC 9110 token characters, less "_" (gunicorn drops or refuses such header names). The
# whitespace runs are possessive: a line of spaces ending in a stray byte must not backtrack
# (quadratic: 8 KB of spaces cost 160 ms of regex before a refusal).
_HEADER = re.compile(rb"([!#$%&'*+\-.^`|~0-9A-Za-z]+):[ \t]*+([!-~](?:[ \t!-~]*[!-~])?)?[ \t]*+\Z")
_REQUEST_LINE = re.compile(rb"GET (/[A-Za-z0-9/._-]*)(?:\?([!$-;=?-Z_a-z~]*))? HTTP/1\.1\Z")
# Headers whose presence means a body, a protocol switch or a negotiation: gunicorn's.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                        b"http2-settings", b"te", b"trailer"})
_KEEP_ALIVE, _CLOSE = b"keep-alive", b"close"
READ_SIZE = 65536
# An answer's header lines as gunicorn accepts them (its TOKEN_RE and HEADER_VALUE_RE):
# possessive, so a long bad value cannot backtrack.
_ANSWER_HEADERS = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]++: [ \t\x21-\x7e\x80-\xff]*+(?:\r\n|\Z))*+")
# gunicorn drops these from an answer (util.is_hoppish): the connection's framing, Server and
# Date are its own.
_HOP_BY_HOP = frozenset(hop_headers)
_OWS = " \t"


# Why a connection went to gunicorn (ccproxy_connections_handed_over_total): data calls that
# are not plain GETs mean something in front of the proxy (a load balancer adding headers
# with underscores, say) costs every call the lane.
# `incomplete`: the client hung up or its header clock ran out mid-head (a slow or hostile
# client, not a data call; gunicorn closes the connection as it always did).
NOT_PLAIN_GET, NOT_DATA_ENDPOINT, INCOMPLETE = "not_plain_get", "not_data_endpoint", "incomplete"
HANDED_OVER_REASONS = (NOT_PLAIN_GET, NOT_DATA_ENDPOINT, INCOMPLETE)


def _handed_over(conn: GuardedSocket, read: bytearray, reason: str) -> bytes:
    conn.guard.handed_over[reason] += 1
    return bytes(read)


class PlainGet:
    """A parsed plain GET: its path, query, headers (as WSGI environ keys) and URL scheme."""

    __slots__ = ("path", "query", "environ_headers", "close", "scheme", "raw_uri")

    def __init__(self, path: str, query: str, environ_headers: dict[str, str], close: bool,
                 scheme: str, raw_uri: str):
        self.path = path
        self.query = query
        self.raw_uri = raw_uri  # the target as sent ("/a?" keeps its "?", as in gunicorn's RAW_URI)
        self.environ_headers = environ_headers
        self.close = close
        self.scheme = scheme


_NO_SCHEME_HEADERS: Mapping[bytes, bytes] = {}


def plain_get(head: bytes, max_line: int, max_fields: int, max_field: int,
              scheme_headers: Mapping[bytes, bytes] = _NO_SCHEME_HEADERS) -> PlainGet | None:
    """The request whose head (without its final blank line) is `head`, if it is a plain GET
    in the lane's subset; None for anything gunicorn must parse. `scheme_headers`: the
    secure-scheme headers (lowercase name -> the value meaning https) this peer may set,
    as gunicorn's forwarded_allow_ips decides; empty for an untrusted peer."""
    lines = head.split(b"\r\n")
    if len(lines[0]) > max_line or len(lines) - 1 > max_fields:
        return None
    first = _REQUEST_LINE.match(lines[0])
    if first is None:
        return None
    headers: dict[str, str] = {}
    close = False
    scheme = ""
    for line in lines[1:]:
        if len(line) + 2 > max_field:  # gunicorn counts the line's CRLF
            return None
        field = _HEADER.match(line)
        if field is None:
            return None
        name, value = field.group(1).lower(), field.group(2) or b""
        if name in _NOT_PLAIN:
            return None
        if name == b"connection":
            option = value.lower()
            if option not in (_KEEP_ALIVE, _CLOSE):
                return None
            close = option == _CLOSE
        expected = scheme_headers.get(name)
        if expected is not None:
            said = "https" if value == expected else "http"
            if scheme and said != scheme:
                return None  # conflicting scheme headers: gunicorn refuses them (400)
            scheme = said
        key = "CONTENT_TYPE" if name == b"content-type" else "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        if key in headers:
            return None  # gunicorn's joining (or refusing) of repeats is the reference
        headers[key] = value.decode("ascii")
    return PlainGet(first.group(1).decode("ascii"), (first.group(2) or b"").decode("ascii"), headers, close,
                    scheme or "http", lines[0][4:-9].decode("ascii"))


def _networks(allowed: Iterable[str]) -> list[Any]:
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            pass  # "*" (handled apart), or an entry gunicorn itself would not match
    return networks


class _Date:
    """The Date header, formatted once a second (gunicorn formats it on every answer)."""

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, formatdate(now, usegmt=True)
        return self.value


class FastLane:
    """The lane of one worker process: `serve` answers a connection's plain GETs of
    `data_paths` with `app`, and returns the bytes gunicorn must take over (None: the
    connection is over)."""

    def __init__(self, app: Callable, data_paths: Iterable[str], cfg: Any,
                 count_request: Callable[[], bool], fair: Callable[[], None], server_header: str,
                 base_environ: Mapping[str, Any] | None = None):
        self.app = app
        # gunicorn strips a SCRIPT_NAME set in the process environment from every path: the
        # lane leaves such a deployment to gunicorn.
        self.data_paths = frozenset(() if os.environ.get("SCRIPT_NAME") else data_paths)
        self.max_line = cfg.limit_request_line or 8190
        self.max_fields = cfg.limit_request_fields
        self.max_field = cfg.limit_request_field_size or 8190
        # Longer heads are gunicorn's to parse (and to refuse with 431 or 414).
        self.max_head = self.max_line + 2 + self.max_fields * (self.max_field + 2) + 2
        # Who may say a request came over https (gunicorn's forwarded_allow_ips), and how.
        allowed = list(getattr(cfg, "forwarded_allow_ips", None) or [])
        self.trust_all = "*" in allowed
        self.trusted = _networks(allowed)
        self.scheme_headers = {name.lower().encode("ascii"): value.encode("latin-1") for name, value in
                               (getattr(cfg, "secure_scheme_headers", None) or {}).items()}
        # The worker's request count (gunicorn's max_requests): False once it stops serving.
        self.count_request = count_request
        # A yield after each answer (proxy/serving.py, fair_worker_class).
        self.fair = fair
        self.server_header = server_header
        # gunicorn's environ keys that do not depend on the request (wsgi.errors and so on).
        self.base_environ = dict(base_environ or {})
        self.date = _Date()

    def scheme_headers_of(self, addr: Any) -> Mapping[bytes, bytes]:
        """The secure-scheme headers this peer may set: none unless gunicorn trusts it."""
        if not self.scheme_headers:
            return _NO_SCHEME_HEADERS
        if self.trust_all or not isinstance(addr, tuple):  # a Unix socket: gunicorn trusts it
            return self.scheme_headers
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return _NO_SCHEME_HEADERS
        return self.scheme_headers if any(ip in net for net in self.trusted) else _NO_SCHEME_HEADERS

    def serve(self, conn: GuardedSocket, addr: Any, server: tuple, read: bytes = b"") -> bytes | None:
        """`read`: bytes already read from the connection (what gunicorn read past the
        request it answered, when the connection comes back to the lane)."""
        scheme_headers = self.scheme_headers_of(addr)
        # A bytearray: a head trickled in byte by byte costs linear time, not quadratic.
        buffered = bytearray(read)
        while True:
            if not conn.before_request(begun=bool(buffered or conn.pending)):
                return None
            head_end = buffered.find(b"\r\n\r\n")
            while head_end < 0:
                if len(buffered) > self.max_head:
                    return _handed_over(conn, buffered, NOT_PLAIN_GET)
                data = conn.recv(READ_SIZE)
                if not data:  # a hang-up or a clock mid-head: gunicorn closes it as ever
                    return _handed_over(conn, buffered, INCOMPLETE) if buffered else None
                buffered += data
                head_end = buffered.find(b"\r\n\r\n", max(0, len(buffered) - len(data) - 3))
            request = plain_get(bytes(buffered[:head_end]), self.max_line, self.max_fields, self.max_field,
                                scheme_headers)
            if request is None:
                return _handed_over(conn, buffered, NOT_PLAIN_GET)
            if request.path not in self.data_paths:
                return _handed_over(conn, buffered, NOT_DATA_ENDPOINT)
            del buffered[:head_end + 4]
            conn.start_answer()
            close = not self.count_request() or request.close
            self.answer(conn, request, addr, server, close)
            if close:
                return None
            self.fair()

    def answer(self, conn: GuardedSocket, request: PlainGet, addr: Any, server: tuple, close: bool) -> None:
        # The environ gunicorn would build for this request (gunicorn/http/wsgi.py, create).
        environ = {**self.base_environ, "wsgi.input": io.BytesIO(b""), "wsgi.multithread": True, "REQUEST_METHOD": "GET",
                   "SCRIPT_NAME": "", "PATH_INFO": request.path, "QUERY_STRING": request.query,
                   "RAW_URI": request.raw_uri,
                   "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
                   "wsgi.url_scheme": request.scheme, **request.environ_headers}
        if isinstance(addr, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = addr[0], str(addr[1])
        else:
            environ["REMOTE_ADDR"] = addr.decode() if isinstance(addr, bytes) else str(addr or "")
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started[:] = [status, headers]
            return None

        chunks = self.app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close_chunks = getattr(chunks, "close", None)
            if close_chunks is not None:
                close_chunks()
        status, headers = started
        conn.sendall(self.head(status, headers, close, len(body)) + body)

    def head(self, status: str, headers: list[tuple[str, str]], close: bool, length: int) -> bytes:
        """The answer's status line and headers, checked and trimmed as gunicorn's Response does."""
        lines = [f"{name}: {value.strip(_OWS)}" for name, value in headers if name.lower() not in _HOP_BY_HOP]
        joined = "\r\n".join(lines)
        if joined.count("\r") != max(len(lines) - 1, 0) or not _ANSWER_HEADERS.fullmatch(joined):
            # A header name outside the token grammar or a control byte in a value (a line
            # break would forge headers): never sent; the worker answers a JSON 500.
            raise ValueError("an answer header is not valid HTTP")
        if not any(name.lower() == "content-length" for name, _ in headers):
            lines.append(f"Content-Length: {length}")
        lines[:0] = [f"HTTP/1.1 {status}", f"Server: {self.server_header}", f"Date: {self.date()}",
                     "Connection: close" if close else "Connection: keep-alive"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
