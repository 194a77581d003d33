"""The proxy's exception tree; one Flask handler turns each into the JSON error shape.

ProxyError                       -> {"ok": false, "error": {"code", "message"}}
├── BadRequest (400)              the caller's query is wrong
├── NotFound (404)                no such endpoint or template
├── LiquidError (422)             a Liquid preview does not parse or render
├── RenderLimitExceeded (422)     a Liquid preview or a template render went over a bound
├── PreviewBusy (503 + Retry-After) every preview slot of this process is taken
├── OutboxUnavailable (503)       a write could not be stored (disk full, outbox cap)
├── IdempotencyKeyReused (422)    an idempotency key sent again with another request
├── ConsentStateUnknown (503)     a consent link would have to guess the choice's state
└── UpstreamError (upstream=...)  an upstream call failed; never cached (502: unexpected 4xx)
    ├── UpstreamAuthError (502)   the upstream refused our credential (not worth a retry)
    ├── NotConfigured (503)       the upstream's settings are missing
    └── TransientError (503 + Retry-After, so Braze's :retry can work)
        ├── UpstreamTimeout       no answer within the deadline
        ├── UpstreamRateLimited   429 upstream, or the proxy's own budget is spent
        ├── UpstreamBadAnswer     an answer we cannot use (not JSON, too big)
        └── UpstreamUnavailable   connection refused/reset, 5xx, circuit open

Where the operator configured a fallback, transient errors become HTTP 200 with it.

CannotListen                     start-up only: the address to serve on cannot be bound
ScenarioError                    `ccproxy simulate-send`: a bad scenario (message, faults, users)
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


class LiquidError(ProxyError):
    """A Liquid preview failed to parse or render; the message is for its author."""

    status = 422
    code = "liquid_error"


class RenderLimitExceeded(ProxyError):
    """A render went over one of its bounds (loops, output, nesting, memory, time) and was
    stopped; the message names the bound and its value. `liquid_limit` for Liquid previews,
    `template_limit` for the message templates."""

    status = 422
    code = "liquid_limit"


class PreviewBusy(ProxyError):
    """Every preview slot of this process is taken; previews are turned away, never queued,
    so that they cannot pile up behind the send path."""

    status = 503
    code = "preview_busy"


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


class TransientError(UpstreamError):
    """A failure that may pass: worth serving stale data, a fallback, or a retry later."""

    status = 503
    default_retry_after = 2

    def __init__(self, upstream: str, message: str, **kwargs):
        super().__init__(upstream, message, **kwargs)
        if self.retry_after is None:
            self.retry_after = self.default_retry_after


class UpstreamTimeout(TransientError):
    code = "upstream_timeout"


class UpstreamRateLimited(TransientError):
    code = "upstream_rate_limited"


class UpstreamBadAnswer(TransientError):
    code = "upstream_bad_answer"


class UpstreamUnavailable(TransientError):
    code = "upstream_unavailable"


class NotConfigured(UpstreamError):
    status = 503
    code = "upstream_not_configured"


class OutboxUnavailable(ProxyError):
    """The outbox cannot store a write now (disk full, unwritable file, cap reached): nothing
    was recorded, so the caller may retry (503 + Retry-After, never a 500)."""

    status = 503
    code = "outbox_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 5):
        super().__init__(message, code=code, retry_after=retry_after)


class IdempotencyKeyReused(ProxyError):
    """An idempotency key came back with a different request than the one it first named."""

    status = 422
    code = "idempotency_key_reused"


class ConsentStateUnknown(ProxyError):
    """A subscription state that a link must bind could not be read: no guess is signed."""

    status = 503
    code = "consent_state_unknown"

    def __init__(self, message: str, *, retry_after: int = 30):
        super().__init__(message, retry_after=retry_after)


class CannotListen(Exception):
    """`serve`/`demo` cannot bind their address (port in use, no permission, unknown host);
    the message is the one line the command prints."""


class ScenarioError(Exception):
    """`ccproxy simulate-send` cannot run its scenario (unreadable message, faults file or
    users CSV, unknown template or sandbox); the message is the one line the command prints."""
