"""The upstream connection pool, with one total time budget per call.

urllib3's read timeout applies to each socket read, so an upstream that trickles its
headers or body a byte at a time never trips it: a 1.4 s read timeout let a call run for
many seconds. Here every read of an answer (status line, headers, body, chunked or not)
first shrinks the socket's timeout to what is left of the call's budget, and fails as a
timeout once nothing is left: connect + headers + body together end by the call's deadline,
whatever the upstream does.

This works the same in plain threads (Flask's test client, `ccproxy demo`) and in gevent
workers (monkey-patched sockets honour `settimeout` per read too), with no extra thread or
timer per call. The deadline is a context variable set around one call (`call_deadline`),
so it follows the request's thread or greenlet; a call without one keeps urllib3's timeouts.
"""

from __future__ import annotations

import contextvars
import http.client
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url

# The monotonic time by which the current upstream call must be over (None: no budget).
_call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)


@contextmanager
def call_deadline(seconds: float) -> Iterator[float]:
    """Give the upstream call made inside this block `seconds` in all."""
    deadline = time.monotonic() + seconds
    token = _call_deadline.set(deadline)
    try:
        yield deadline
    finally:
        _call_deadline.reset(token)


class _BoundedReader(io.RawIOBase):
    """The socket reader of one answer: each read may wait only for what is left of the
    call's budget (and never longer than the per-read timeout urllib3 set)."""

    def __init__(self, raw: Any, sock: Any, deadline: float):
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._deadline = deadline
        self._per_read = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the upstream call's time budget is spent")
        self._sock.settimeout(left if self._per_read is None else min(self._per_read, left))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        # Closing the socket reader drops its reference on the socket (as http.client does).
        if not self.closed:
            self._raw.close()
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    """http.client's response reading through a `_BoundedReader` when a call budget is set."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        deadline = _call_deadline.get()
        if deadline is not None:
            # Keep makefile()'s socket reference (a `Connection: close` answer stays readable
            # after urllib3 closes the connection), only bound each read.
            raw = self.fp.detach()  # type: ignore[union-attr]
            self.fp = io.BufferedReader(_BoundedReader(raw, sock, deadline))


class _BoundedHTTPConnection(HTTPConnection):
    response_class = _BoundedResponse


class _BoundedHTTPSConnection(HTTPSConnection):
    response_class = _BoundedResponse


class _BoundedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _BoundedHTTPConnection


class _BoundedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _BoundedHTTPSConnection


def bounded_pool(manager: urllib3.PoolManager) -> urllib3.PoolManager:
    """Make a pool manager's connections read answers within the call's budget."""
    manager.pool_classes_by_scheme = {"http": _BoundedHTTPPool, "https": _BoundedHTTPSPool}
    return manager


class Origin:
    """One upstream's base URL, resolved once to its connection pool in the shared manager.

    `PoolManager.request` parses the whole URL and normalises a pool key on every call, and
    the host pool parses it again: a fifth of a cache miss's exchange, for an answer known
    when the client was built (bench/RESULTS.md, "cheaper misses"). A call here sends its
    path to the origin's pool directly. Through an egress proxy (`ProxyManager`, which
    rewrites the request target per scheme) every call still goes through the manager."""

    def __init__(self, manager: urllib3.PoolManager, base_url: str):
        self.manager = manager
        self.base_url = base_url.rstrip("/")
        try:
            url = parse_url(self.base_url)
        except urllib3.exceptions.LocationParseError:
            url = parse_url("")  # through the manager, which fails each call as before
        self.scheme, self.host, self.port = url.scheme, url.host, url.port
        self.base_path = (url.path or "").rstrip("/")
        self._direct = bool(self.host) and not isinstance(manager, urllib3.ProxyManager)
        self._pool: HTTPConnectionPool | None = None

    def urlopen(self, method: str, path: str, **kw: Any) -> urllib3.BaseHTTPResponse:
        """Send `method path` (path and query, below the base URL) with urlopen's keywords."""
        if not self._direct:
            return self.manager.urlopen(method, self.base_url + path, **kw)
        pool = self._pool
        if pool is None:
            # Kept for good: urllib3 2's manager never closes a pool it evicts or clears.
            pool = self._pool = self.manager.connection_from_host(self.host, self.port, self.scheme)
        return pool.urlopen(method, self.base_path + path, assert_same_host=False, **kw)
