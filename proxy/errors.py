"""The proxy's exception tree: every exception class of the proxy lives here. One function,
`dispatch.http_answer`, turns each ProxyError into its status, headers and JSON error shape,
for the data endpoints' fast path, in-process calls and Flask's error handlers alike.

ProxyError                       -> {"ok": false, "error": {"code", "message"}}
├── InternalError (500)           anything unexpected: the caller sees no detail, the log does
├── BadRequest (400)              the caller's query is wrong
├── Unauthorized (401 + WWW-Authenticate) no valid API key
├── NotFound (404)                no such endpoint or template
├── MethodNotAllowed (405 + Allow) a method the path does not answer
├── BodyTooLarge (413)            a write body over CCPROXY_MAX_BODY
├── BodyTimeout (408)             a request body not received within CCPROXY_BODY_TIMEOUT
├── LiquidError (422)             a Liquid preview does not parse or render
├── TemplateError (422)           a message template fails to compile or render (file, line)
├── RenderLimitExceeded (422)     a Liquid preview or a template render went over a bound
├── PreviewBusy (503 + Retry-After) every preview slot of this process is taken
├── OutboxUnavailable (503)       a write could not be stored (disk full, outbox cap)
├── IdempotencyKeyReused (422)    an idempotency key sent again with another request
├── IdempotencyKeyInProgress (409 + Retry-After) the key's first request is still being stored
├── ConsentStateUnknown (503)     a consent link would have to guess the choice's state
└── UpstreamError (upstream=...)  an upstream call failed; never cached (502: unexpected 4xx)
    ├── UpstreamAuthError (502)   the upstream refused our credential (not worth a retry)
    ├── NotConfigured (503)       the upstream's settings are missing
    └── TransientError (503 + Retry-After, so Braze's :retry can work)
        ├── UpstreamTimeout       no answer within the deadline
        ├── UpstreamRateLimited   429 upstream, or the proxy's own budget is spent
        ├── UpstreamBadAnswer     an answer we cannot use (not JSON, too big)
        └── UpstreamUnavailable   connection refused/reset, 5xx
            └── CircuitOpen       the upstream's breaker is open: not called for now

Where the operator configured a fallback, transient errors become HTTP 200 with it.

CannotListen                     start-up only: the address to serve on cannot be bound
LinkError                        a signed link is invalid or expired (answered as an HTML page)
SettingsError (ValueError)       a setting is missing or malformed (start-up, `ccproxy check`)
MessageAborted                   a Liquid preview ran abort_message
PixelRefused                     a pixel load not recorded (the GIF answers all the same)
Retryable                        inside a client: worth one retry
ScenarioError                    `ccproxy simulate-send`: a bad scenario (message, faults, users)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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


class InternalError(ProxyError):
    """Anything unexpected: the answer names no detail (it is logged with its traceback)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str = "the proxy failed; see its logs"):
        super().__init__(message)


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        # Basic lets a browser prompt once for /preview; its fetches then carry the key.
        return {"WWW-Authenticate": 'Basic realm="ccproxy", charset="UTF-8"'}


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """The path exists but does not answer this method; `Allow` lists the ones it does."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, allowed: Iterable[str], message: str = "method not allowed on this endpoint"):
        super().__init__(message)
        self.allowed = sorted(set(allowed))

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes (CCPROXY_MAX_BODY)")


class BodyTimeout(ProxyError):
    """Answered by the server itself (proxy/connections.py), then the connection is closed."""

    status = 408
    code = "body_timeout"

    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} s (CCPROXY_BODY_TIMEOUT)")


class LiquidError(ProxyError):
    """A Liquid preview failed to parse or render; the message is for its author."""

    status = 422
    code = "liquid_error"


class TemplateError(ProxyError):
    """A template failed to compile or render; names the file and line."""

    status = 422
    code = "template_error"

    def __init__(self, template: str, line: int | None, detail: str):
        where = f"{template} line {line}" if line else template
        super().__init__(f"{where}: {detail}")
        self.template, self.line = template, line

    def body(self) -> dict:
        body = super().body()
        body["error"].update({"template": self.template, "line": self.line})
        return body


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


class WriteMisdirected(UpstreamError):
    """An outbox write accepted for another mediarithmics datamart than the one this proxy
    writes to (a demo's outbox, another deployment's file): never sent with this proxy's
    token; a dead letter for an operator."""

    status = 409
    code = "write_misdirected"


class TransientError(UpstreamError):
    """A failure that may pass: worth serving stale data, a fallback, or a retry later."""

    status = 503
    default_retry_after = 2

    def __init__(self, upstream: str, message: str, **kwargs: Any):
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


class CircuitOpen(UpstreamUnavailable):
    code = "upstream_circuit_open"


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


class IdempotencyKeyInProgress(ProxyError):
    """Another request with this idempotency key is still being stored (seen in Redis as
    pending): retry shortly and get its answer; nothing was recorded for this one."""

    status = 409
    code = "idempotency_key_in_progress"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message, retry_after=retry_after)


class ConsentStateUnknown(ProxyError):
    """A subscription state that a link must bind could not be read: no guess is signed."""

    status = 503
    code = "consent_state_unknown"

    def __init__(self, message: str, *, retry_after: int = 30):
        super().__init__(message, retry_after=retry_after)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


class Retryable(Exception):
    """Inside a client: a failure worth one retry of an idempotent call; carries the
    UpstreamError to raise otherwise. Never leaves the client."""

    def __init__(self, error: UpstreamError):
        super().__init__(error.message)
        self.error = error


class MessageAborted(Exception):
    """A Liquid preview ran `abort_message`: Braze would not send this message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PixelRefused(Exception):
    """Why a pixel load is not recorded (logged and counted; the GIF answers all the same)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class CannotListen(Exception):
    """`serve`/`demo` cannot bind their address (port in use, no permission, unknown host);
    the message is the one line the command prints."""


class LinkError(Exception):
    """A signed link that is not ours, was altered, or expired; `reason` is safe to show the
    recipient (an HTML page, not the JSON error shape)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ScenarioError(Exception):
    """`ccproxy simulate-send` cannot run its scenario (unreadable message, faults file or
    users CSV, unknown template or sandbox); the message is the one line the command prints."""


class WorkerGone(BaseException):
    """A preview render process lost its worker's socket mid-render: the process stops
    (preview_worker.py). A BaseException, so neither Liquid's error handling nor the render's
    own `except Exception` mistakes it for the template's error (a filter's OSError, say, is
    the template's)."""


class WarmRefused(Exception):
    """`ccproxy warm`: the first call failed in a way every call would (a missing parameter,
    a wrong key, no proxy at the URL); the message says how, and nothing else was sent."""
