"""The per-request envelope, as one WSGI middleware around the Flask app: request id,
deadline, inbound auth, metrics and the access log.

It is WSGI rather than Flask hooks because it runs on every request, hits included:
Flask's hook machinery and context-local lookups cost more than the work itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from . import auth, dispatch, observability
from .errors import InternalError, MethodNotAllowed, ProxyError
from .guards import end_deadline, start_deadline
from .responses import JSON_TYPE

if TYPE_CHECKING:
    from .services import Services

# What a data endpoint answers; OPTIONS is answered with Allow, as Flask does for its routes.
DATA_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

access_log = logging.getLogger("ccproxy.access")
_HEADER_ENVIRON = {"Authorization": "HTTP_AUTHORIZATION", "X-Api-Key": "HTTP_X_API_KEY"}


class _EnvironHeaders:
    """The two request headers auth reads, straight from the WSGI environ."""

    def __init__(self, environ: dict):
        self.environ = environ

    def get(self, name: str, default: Any = None) -> Any:
        return self.environ.get(_HEADER_ENVIRON.get(name, ""), default)

    def __getitem__(self, name: str) -> Any:
        return self.environ[_HEADER_ENVIRON[name]]


def route_of(path: str, exact: frozenset[str], prefixes: Iterable[tuple[str, str]] = ()) -> str:
    """A low-cardinality route label for metrics and logs: the path of a fixed route, else
    the label of the first (longest) matching `(prefix, label)` of a route with variables."""
    if path in exact:
        return path
    for prefix, label in prefixes:
        if path.startswith(prefix):
            return label
    return "unmatched"


def query_args(query_string: str) -> dict[str, str]:
    """Query parameters, the first value of each winning (as Flask's request.args.get)."""
    args: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True, errors="replace"):
        args.setdefault(key, value)
    return args


class RequestEnvelope:
    """Request id, deadline, auth, metrics and access log around every request; and the
    data endpoints answered directly: the endpoint registry is their only router (Flask
    has no views for them). Their handlers never see Flask (the layering), so the hot path
    (a cache hit) skips Flask's request cycle, which costs as much as the rest of the
    answer; everything else goes to the Flask app."""

    def __init__(self, app: Callable, metrics: observability.Metrics, api_keys: list[str],
                 deadline: float, routes: Iterable[str], services: Services,
                 endpoints: Mapping[str, Any] | None = None,
                 app_methods: Mapping[str, Iterable[str]] | None = None, *,
                 prefixes: Mapping[str, str] | None = None,
                 open_paths: Iterable[str] = ()):
        self.app = app
        self.metrics = metrics
        self.api_keys = api_keys
        self.deadline = deadline
        self.routes = frozenset(routes)
        # Routes with variables, by the path before the first one: longest first.
        self.prefixes = sorted((prefixes or {}).items(), key=lambda item: -len(item[0]))
        self.open_paths = frozenset(open_paths)
        self.services = services
        self.endpoints = dict(endpoints or {})
        # Methods the Flask app answers on a data endpoint's path (the writes: PUT, POST).
        self.app_methods = {path: frozenset(methods) - DATA_METHODS
                            for path, methods in (app_methods or {}).items()}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = observability.accept_request_id(environ.get("HTTP_X_REQUEST_ID"))
        id_token = observability.set_request_id(request_id)
        deadline_token = start_deadline(self.deadline)
        status_holder = ["500"]
        cache_holder = ["-"]

        def respond(status: str, headers: list, exc_info: Any = None) -> Any:
            status_holder[0] = status[:3]
            headers.append(("X-Request-Id", request_id))
            headers.append(("X-Content-Type-Options", "nosniff"))
            for name, value in headers:
                if name == "X-Cache":
                    cache_holder[0] = value
            return start_response(status, headers, exc_info)

        path = environ.get("PATH_INFO", "")
        try:
            method = environ.get("REQUEST_METHOD", "GET")
            try:
                auth.check(path, _EnvironHeaders(environ), self.api_keys, self.open_paths)
            except ProxyError as refused:
                return _send(respond, refused, method)
            endpoint = self.endpoints.get(path)
            app_methods = self.app_methods.get(path, frozenset())
            if endpoint is None or method in app_methods:
                return self.app(environ, respond)
            if method in ("GET", "HEAD"):
                args = query_args(environ.get("QUERY_STRING", ""))
                return _send(respond, dispatch.run(endpoint, self.services, args, path), method)
            allowed = DATA_METHODS | app_methods
            if method == "OPTIONS":
                respond("200 OK", [("Allow", ", ".join(sorted(allowed))), ("Content-Length", "0")])
                return []
            return _send(respond, MethodNotAllowed(allowed), method)
        finally:
            end_deadline(deadline_token)
            seconds = time.perf_counter() - started
            route = self.route_of(path)
            status = int(status_holder[0])
            self.metrics.observe_request(route, status, seconds, cache_holder[0])
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("request", extra={"fields": {
                    "method": environ.get("REQUEST_METHOD"), "route": route, "path": path,
                    # Parameter names only: values are customer ids.
                    "params": sorted({p.split("=", 1)[0] for p in environ.get("QUERY_STRING", "").split("&") if p}),
                    "status": status, "ms": round(seconds * 1000, 2), "cache": cache_holder[0],
                }})
            observability.reset_request_id(id_token)


    def route_of(self, path: str) -> str:
        return route_of(path, self.routes, self.prefixes)


def _send(respond: Callable, outcome: Any, method: str) -> list[bytes]:
    """Send dispatch's answer for `outcome`; HEAD gets the same status and headers (its
    Content-Length included) and no body."""
    try:
        status, headers, payload = dispatch.http_bytes(outcome)
    except (TypeError, ValueError):  # an answer JSON cannot carry: a JSON 500, never a traceback page
        dispatch.log.exception("answer not encodable as JSON")
        status, headers, payload = dispatch.http_bytes(InternalError())
    respond(dispatch.status_line(status), [("Content-Type", JSON_TYPE),
                                           ("Content-Length", str(len(payload))), *headers.items()])
    return [] if method == "HEAD" else [payload]
