"""One way from a data endpoint's outcome to HTTP: `http_answer` turns a handler's `Result`
or a `ProxyError` into status, headers and body (`http_bytes`: the body as the bytes sent).
The WSGI fast path (GET and HEAD of the data endpoints, middleware.py), the in-process
`call` (templates, previews, consent links) and Flask's error handlers (every other route,
app.py) all answer through it, so the same outcome reads the same wherever it is asked for.

Pure functions of their arguments: nothing here is per process or shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, InternalError, ProxyError, UpstreamError
from .responses import cache_headers, json_bytes

if TYPE_CHECKING:
    from .endpoints import Endpoint, Result
    from .services import Services

log = logging.getLogger("ccproxy")
access_log = logging.getLogger("ccproxy.access")


def log_failure(error: ProxyError, path: str) -> None:
    """What failed upstream and how: never the credential or the full upstream URL."""
    if isinstance(error, UpstreamError):
        log.warning(
            "upstream failure: upstream=%s code=%s upstream_status=%s path=%s",
            error.upstream, error.code, error.upstream_status, path,
        )


def _serving_path() -> str:
    """The HTTP request an in-process call serves (a render, a consent link), when there is one."""
    from flask import has_request_context, request

    return request.path if has_request_context() else "-"


def status_line(status: int) -> str:
    """`404 Not Found`: the reason phrase from http.HTTPStatus (any status it knows)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def run(endpoint: Endpoint, services: Services, args: Mapping[str, str], path: str) -> Result | ProxyError:
    """The handler's outcome: its Result, or the ProxyError it raised (an upstream failure
    logged on `path`, the route the caller asked for; anything else an InternalError)."""
    try:
        return endpoint.run(services, args)
    except ProxyError as error:
        log_failure(error, path)
        return error
    except Exception:
        log.exception("unexpected error on %s", path)
        return InternalError()


def http_answer(outcome: Result | ProxyError) -> tuple[int, dict[str, str], dict[str, Any]]:
    """THE answer for an outcome: status, headers (cache or Retry-After/Allow/...) and the
    JSON body (json_bytes makes it bytes on the wire)."""
    if isinstance(outcome, ProxyError):
        return outcome.status, outcome.headers(), outcome.body()
    return 200, cache_headers(outcome.lookup), outcome.final_body()


def http_bytes(outcome: Result | ProxyError) -> tuple[int, dict[str, str], bytes]:
    """`http_answer` with the body as the JSON bytes sent: a Result's own (`Result.payload`,
    kept on its cached answer). Raises TypeError or ValueError for a body JSON cannot carry."""
    if isinstance(outcome, ProxyError):
        status, headers, body = http_answer(outcome)
        return status, headers, json_bytes(body)
    return 200, cache_headers(outcome.lookup), outcome.payload()


@dataclass(frozen=True, slots=True)
class Call:
    """One in-process endpoint call, as previews and the render layer report it."""

    path: str
    status: int
    body: dict[str, Any]
    cache: str  # HIT, MISS, COALESCED, or "-" when the call failed before the cache
    ms: float
    max_age: float | None = None
    headers: dict[str, str] | None = None  # what an HTTP caller would have been sent

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "cache": self.cache,
                "ms": round(self.ms, 2), "body": self.body}


def call(endpoint: Endpoint, services: Services, args: Mapping[str, str], path: str = "") -> Call:
    """Run a data endpoint without HTTP; the answer is the one HTTP would give.

    A bad request or an unexpected failure is raised (the caller's input is wrong, or the
    proxy is: the surrounding request fails as a whole); an upstream failure is returned,
    so a template can show its fallback instead of failing the message. `path` is the
    request being served (e.g. /v1/render/<name>), for the failure log.
    """
    started = time.perf_counter()
    outcome = run(endpoint, services, args, path or endpoint.path)
    if isinstance(outcome, (BadRequest, InternalError)):
        raise outcome
    status, headers, body = http_answer(outcome)
    ms = (time.perf_counter() - started) * 1000
    lookup = None if isinstance(outcome, ProxyError) else outcome.lookup
    cache = lookup.state if lookup else "-"
    # Seen like an HTTP call (metric, access-log fields), but apart: Braze did not ask for it,
    # and the route it was made for is counted and logged on its own.
    if services.observe_call is not None:
        services.observe_call(endpoint.path, status, cache)
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("in-process call", extra={"fields": {
            "route": endpoint.path, "within": path or _serving_path(),
            "params": sorted(args),  # names only: values are customer ids
            "status": status, "ms": round(ms, 2), "cache": cache,
        }})
    return Call(endpoint.path, status, body, cache, ms, lookup.max_age if lookup else None, headers)

