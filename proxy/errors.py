"""The proxy's exception tree; one Flask handler turns each into the JSON error shape.

ProxyError                       -> {"ok": false, "error": {"code", "message"}}
├── BadRequest (400)              the caller's query is wrong
├── NotFound (404)                no such endpoint or template
└── UpstreamError (upstream=...)  an upstream call failed; never cached
    ├── UpstreamAuthError (502)   the upstream refused our credential
    ├── UpstreamTimeout (504)     no answer in time
    ├── UpstreamRateLimited (503) the upstream said 429; carries Retry-After
    ├── UpstreamBadAnswer (502)   an answer we cannot use (not JSON, too big)
    ├── UpstreamUnavailable (502) connection refused/reset, 5xx
    └── NotConfigured (503)       the upstream's settings are missing
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy answers with; `message` is safe to show a caller."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class UpstreamError(ProxyError):
    """An upstream call failed; `upstream` names which one, `upstream_status` what it said."""

    status = 502
    code = "upstream_error"

    def __init__(
        self,
        upstream: str,
        message: str,
        *,
        upstream_status: int | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message, retry_after=retry_after)
        self.upstream = upstream
        self.upstream_status = upstream_status


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    status = 503
    code = "upstream_rate_limited"


class UpstreamBadAnswer(UpstreamError):
    code = "upstream_bad_answer"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class NotConfigured(UpstreamError):
    status = 503
    code = "upstream_not_configured"
