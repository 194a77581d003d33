"""The per-request envelope, as one WSGI middleware around the Flask app: request id,
deadline, inbound auth, metrics and the access log.

It is WSGI rather than Flask hooks because it runs on every request, hits included:
Flask's hook machinery and context-local lookups cost more than the work itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from . import auth, observability
from .errors import ProxyError, UpstreamError
from .guards import end_deadline, start_deadline
from .responses import JSON_TYPE, cache_headers, json_bytes

INTERNAL_ERROR = {"ok": False, "error": {"code": "internal_error", "message": "the proxy failed; see its logs"}}
_REASONS = {400: "BAD REQUEST", 401: "UNAUTHORIZED", 404: "NOT FOUND", 422: "UNPROCESSABLE ENTITY",
            500: "INTERNAL SERVER ERROR", 502: "BAD GATEWAY", 503: "SERVICE UNAVAILABLE",
            504: "GATEWAY TIMEOUT"}


def log_failure(error: ProxyError, path: str) -> None:
    """What failed upstream and how: never the credential or the full upstream URL."""
    if isinstance(error, UpstreamError):
        logging.getLogger("ccproxy").warning(
            "upstream failure: upstream=%s code=%s upstream_status=%s path=%s",
            error.upstream, error.code, error.upstream_status, path,
        )

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


def route_of(path: str, exact: frozenset[str]) -> str:
    """A low-cardinality route label for metrics and logs."""
    if path in exact:
        return path
    if path.startswith("/v1/render/"):
        return "/v1/render/<name>"
    if path.startswith("/v1/preview/render/"):
        return "/v1/preview/render/<name>"
    if path.startswith("/v1/mediarithmics/writes/"):
        return "/v1/mediarithmics/writes/<id>"
    return "unmatched"


def query_args(query_string: str) -> dict[str, str]:
    """Query parameters, the first value of each winning (as Flask's request.args.get)."""
    args: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True, errors="replace"):
        args.setdefault(key, value)
    return args


class RequestEnvelope:
    """Request id, deadline, auth, metrics and access log around every request; and the
    data endpoints' GETs answered directly. Their handlers never see Flask (the layering),
    so the hot path (a cache hit) skips Flask's request cycle, which costs as much as the
    rest of the answer; everything else goes to the Flask app."""

    def __init__(self, app: Callable, metrics: observability.Metrics, api_keys: list[str],
                 deadline: float, routes: Iterable[str], services: Any = None,
                 endpoints: Mapping[str, Any] | None = None):
        self.app = app
        self.metrics = metrics
        self.api_keys = api_keys
        self.deadline = deadline
        self.routes = frozenset(routes)
        self.services = services
        self.endpoints = dict(endpoints or {})

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = observability.accept_request_id(environ.get("HTTP_X_REQUEST_ID"))
        id_token = observability.set_request_id(request_id)
        deadline_token = start_deadline(self.deadline)
        status_holder = ["500"]
        cache_holder = ["-"]

        def respond(status: str, headers: list, exc_info: Any = None):
            status_holder[0] = status[:3]
            headers.append(("X-Request-Id", request_id))
            headers.append(("X-Content-Type-Options", "nosniff"))
            for name, value in headers:
                if name == "X-Cache":
                    cache_holder[0] = value
            return start_response(status, headers, exc_info)

        path = environ.get("PATH_INFO", "")
        try:
            try:
                auth.check(path, _EnvironHeaders(environ), self.api_keys)
            except auth.Unauthorized as refused:
                body = json.dumps(refused.body()).encode()
                respond("401 UNAUTHORIZED", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(body))),
                                             *refused.headers().items()])
                return [body]
            endpoint = self.endpoints.get(path)
            if endpoint is not None and environ.get("REQUEST_METHOD") == "GET":
                return self._answer(endpoint, environ, respond)
            return self.app(environ, respond)
        finally:
            end_deadline(deadline_token)
            seconds = time.perf_counter() - started
            route = route_of(path, self.routes)
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

    def _answer(self, endpoint: Any, environ: dict, respond: Callable) -> list[bytes]:
        """One data endpoint GET, as the Flask view and its error handler would answer it."""
        try:
            result = endpoint.handler(self.services, query_args(environ.get("QUERY_STRING", "")))
            status, body = "200 OK", json_bytes(result.final_body())
            headers = cache_headers(result.lookup)
        except ProxyError as error:
            log_failure(error, environ.get("PATH_INFO", ""))
            status, body, headers = f"{error.status} {_REASONS.get(error.status, 'ERROR')}", \
                json_bytes(error.body()), error.headers()
        except Exception:
            logging.getLogger("ccproxy").exception("unexpected error on %s", environ.get("PATH_INFO"))
            status, body, headers = "500 INTERNAL SERVER ERROR", json_bytes(INTERNAL_ERROR), {}
        respond(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(body))),
                         *headers.items()])
        return [body]
