"""A serving design measured by bench/serving_options.py, not what `ccproxy serve` runs: the
proxy behind granian's RSGI interface, cache hits answered on each worker's event loop and
everything else (misses, writes, renders, operator routes) by the same WSGI app in a pool of
threads, so a miss waiting on its upstream holds a pool thread, never the loop the hits use.

    granian --interface rsgi --factory --working-dir bench granian_rsgi_app:load_app

A data GET first runs on the loop with the answer cache in "memory only" mode: a fresh entry
in this process's memory is answered there (the same envelope, handler and shaper as
always); anything that would wait (a memory miss: the upstream, the box file, Redis) raises
`WouldWait` before any I/O, and the request is run again in a pool thread. Per process: the
memory cache and the pool. Left out of the prototype: the box cache (in-process apps have
none), outbox delivery, the slow-client clocks of `proxy/connections.py` (granian has its
own header and keep-alive timeouts), and a miss's first attempt is counted twice in the
request metrics."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Threads per worker for what the loop does not answer: Braze's burst holds hundreds of
# misses in flight, each waiting on its upstream.
POOL_THREADS = int(os.environ.get("CCPROXY_BENCH_POOL_THREADS", "256"))
_on_loop: ContextVar[bool] = ContextVar("on_loop", default=False)


class WouldWait(BaseException):
    """A lookup on the loop that needs I/O (BaseException: the dispatcher's `except Exception`
    turns errors into answers; this is a change of thread, not an error)."""


def environ_of(scope: Any, body: bytes) -> dict[str, Any]:
    environ = {"REQUEST_METHOD": scope.method, "PATH_INFO": scope.path, "QUERY_STRING": scope.query_string,
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": scope.scheme, "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
               "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": True,
               "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body))}
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ[key] = value
        elif key != "CONTENT_LENGTH":
            environ["HTTP_" + key] = value
    return environ


def lean_environ(scope: Any) -> dict[str, Any]:
    """What the envelope and a data handler read of a GET (middleware.py): no body, three headers."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": scope.path, "QUERY_STRING": scope.query_string}
    headers = scope.headers
    for name, key in (("authorization", "HTTP_AUTHORIZATION"), ("x-api-key", "HTTP_X_API_KEY"),
                      ("x-request-id", "HTTP_X_REQUEST_ID")):
        value = headers.get(name)
        if value is not None:
            environ[key] = value
    return environ


def call_wsgi(app: Callable, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"], started["headers"] = int(status[:3]), headers

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    return started["status"], started["headers"], body


class HybridApp:
    def __init__(self) -> None:
        from proxy import config, create_app
        from proxy.services import of_app

        self.app = create_app(config.load())
        # The envelope alone answers data GETs (Flask has no views for them: middleware.py).
        self.envelope = self.app.wsgi_app
        services = of_app(self.app)
        self.data_paths = frozenset(services.endpoints)
        cache, memory = services.cache, services.cache.store
        fetch_through = cache.fetch

        def fetch(key: str, load: Any, ttl_of: Any) -> Any:
            if _on_loop.get():
                entry = memory.get(key)
                if entry is None or cache.timer() - entry.stored_at >= entry.ttl:
                    raise WouldWait
            return fetch_through(key, load, ttl_of)

        cache.fetch = fetch  # type: ignore[method-assign]
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="wsgi")

    async def __call__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        if scope.method == "GET" and scope.path in self.data_paths:
            token = _on_loop.set(True)
            try:
                proto.response_bytes(*call_wsgi(self.envelope, lean_environ(scope)))
                return
            except WouldWait:
                pass
            finally:
                _on_loop.reset(token)
        body = await proto()
        answer = await asyncio.get_running_loop().run_in_executor(
            self.pool, call_wsgi, self.app, environ_of(scope, body))
        proto.response_bytes(*answer)


def load_app() -> HybridApp:
    return HybridApp()
