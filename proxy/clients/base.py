"""HTTP plumbing shared by the upstream clients: one connection pool, timeouts, a size cap,
and the mapping of transport failures and HTTP statuses to the typed errors in `errors.py`.

Clients never import Flask and never cache; they return parsed JSON or raise.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from .. import __version__
from ..errors import (
    NotConfigured,
    UpstreamAuthError,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..errors import Retryable as _Retryable
from ..guards import CircuitBreaker, Guards, Limiter, RetryBudget, check_time_left, remaining
from ..json_depth import MAX_DEPTH, nesting_exceeds
from ..observability import current_request_id
from .transport import Origin, bounded_pool, call_deadline

USER_AGENT = f"connected-content-proxy/{__version__}"
# What a client reports of each call: (upstream, outcome, seconds).
Observe = Callable[[str, str, float], None]


def _unobserved(upstream: str, outcome: str, seconds: float) -> None:
    """No metrics (a client used alone, as `ccproxy check` does)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A usable upstream answer. `missing` marks "no such user/profile" (cached briefly)."""

    data: Any
    missing: bool = False
    # This answer's JSON bytes as endpoints sent it, by shaper and arguments (endpoints.Result):
    # kept on the cached answer, so they live and expire with its cache entry. Never encoded
    # into a shared store (entry_codec); per process.
    encoded: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Query:
    """One read a client offers (an intent), not yet sent: `operation` and `params` say what
    it asks (the cache key, with no secret in it), `send` asks it. The cache decides whether
    it is sent at all."""

    client: HttpClient
    operation: str
    params: dict[str, str]
    send: Callable[[], Answer]


def _compact_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Intern keys and short string values: cached answers repeat the same field names and
    many of the same values (rec ids, sources, catalogue items), and sharing one string
    object saves most of a cached entry's memory."""
    return {sys.intern(k): _shared(v) for k, v in pairs}


def _shared(value: Any) -> Any:
    if type(value) is str:
        return sys.intern(value) if len(value) <= 48 else value
    if type(value) is list:
        return [sys.intern(v) if type(v) is str and len(v) <= 48 else v for v in value]
    return value


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; passing them on would make our own answers invalid.
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # `1e400` is valid JSON that Python reads as infinity: as unusable as NaN, and our own
    # encoder would refuse the answer on every request for as long as it stayed cached.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of a double's range")
    return value


def _lone_surrogates(content: bytes, parsed: Any) -> bool:
    """Whether a string escapes half a UTF-16 pair (`\\ud800` alone): valid JSON text, but not
    encodable as UTF-8, so our answers could not carry it. Only looked for when a surrogate
    escape appears at all (emoji escapes come in pairs and pass)."""
    if b"\\ud" not in content and b"\\uD" not in content:
        return False
    try:
        json.dumps(parsed, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


_DECODER = json.JSONDecoder(object_pairs_hook=_compact_object, parse_constant=_no_constants,
                            parse_float=_finite)


def make_pool(pool_size: int = 64, proxy: str = "") -> urllib3.PoolManager:
    """Pooled keep-alive connections, many per upstream host, shared by every client.

    urllib3 directly rather than requests: on a cache miss requests' per-call layers (settings
    merging, environment proxy lookups, hooks) cost more CPU than the HTTP exchange itself.
    Nothing here reads the environment; an egress proxy is explicit (`CCPROXY_UPSTREAM_PROXY`).
    """
    options: dict[str, Any] = {"num_pools": 16, "maxsize": pool_size, "block": False, "retries": False,
               "headers": {"User-Agent": USER_AGENT}}
    if proxy:
        return bounded_pool(urllib3.ProxyManager(proxy, **options))
    return bounded_pool(urllib3.PoolManager(**options))


def retry_after_seconds(value: str | None, default: int = 1) -> int:
    """Seconds from a Retry-After header (RFC 9110: delay-seconds or an HTTP-date), between
    1 s and an hour; a sane default when absent or unreadable."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return default
    if not math.isfinite(seconds):  # NaN, inf, 1e999: an upstream's typo, not a pause
        return default
    return max(1, min(3600, math.ceil(seconds)))


def path_segment(value: str) -> str:
    """Percent-encode an id for use as one URL path segment: it cannot add segments,
    a query or a host, and `.`/`..` cannot be collapsed by URL normalisation."""
    if value.strip(".") == "":
        return value.replace(".", "%2E")
    return quote(value, safe="")


class HttpClient:
    """Base of the upstream clients: GET/PUT/POST JSON with typed failures."""

    name = "upstream"
    credential = ""  # a tag of the credential (config.credential_id), never the secret
    # Settings that must be set before this client can be used (env names for the message).
    required: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        pool: urllib3.PoolManager,
        base_url: str,
        *,
        guards: Guards,
        connect_timeout: float,
        read_timeout: float,
        max_bytes: int,
        observe: Observe | None = None,
    ):
        self.pool = pool
        self.origin = Origin(pool, base_url)
        self.timeout = (connect_timeout, read_timeout)
        self.max_bytes = max_bytes
        self.breaker: CircuitBreaker = guards.breaker
        self.limiter: Limiter = guards.limiter
        self.retry_budget: RetryBudget = guards.retry_budget
        # (upstream, outcome, seconds) for each call: the app's metrics.
        self.observe: Observe = observe or _unobserved
        # Retry-After pauses this upstream asked of this process (metrics).
        self.pauses = 0

    @property
    def base_url(self) -> str:
        """The upstream's base URL, without a trailing slash."""
        return self.origin.base_url

    def fallback(self, query: Query, content: Mapping[str, Any]) -> Any:
        """The operator's fallback content as this upstream would have answered `query`, so
        the shapers read it like real data; None when this read has no fallback."""
        return None

    def require(self) -> None:
        """Fail clearly (503, naming the setting) when a required setting is empty."""
        for env_name, value in self.required:
            if not value:
                raise NotConfigured(self.name, f"{self.name} is not configured: set {env_name}")

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        ok_statuses: tuple[int, ...] = (200,),
    ) -> tuple[int, Any]:
        """Send one request within the request's deadline, through the breaker and limiter;
        answer (status, parsed JSON) for a status in ok_statuses.

        GETs are retried once, on a broken connection (e.g. a stale pooled one) or a 502-504,
        when the retry budget and the deadline allow it.
        """
        self.require()
        self.retry_budget.record_call()
        retries_left = 1 if method in ("GET", "HEAD") else 0
        while True:
            left = check_time_left(self.name)
            self.breaker.allow()
            try:
                self.limiter.acquire()
            except UpstreamError:
                self.breaker.release()
                raise
            started = time.perf_counter()
            try:
                answer = self._attempt(method, path, params, headers, json_body, ok_statuses, left)
                self.observe(self.name, str(answer[0]), time.perf_counter() - started)
                return answer
            except UpstreamError as failed:
                self.observe(self.name, str(failed.upstream_status or failed.code),
                             time.perf_counter() - started)
                raise
            except _Retryable as retryable:
                self.observe(self.name, str(retryable.error.upstream_status or retryable.error.code),
                             time.perf_counter() - started)
                self.breaker.failure()
                error = retryable.error
                if retries_left <= 0 or not self._retry_allowed():
                    raise error from None
                retries_left -= 1
            except BaseException:
                # Anything unforeseen (a bug, a killed greenlet): never leave a half-open
                # probe marked as running, or the breaker would refuse every call for good.
                self.breaker.release()
                raise

    def _retry_allowed(self) -> bool:
        backoff = random.uniform(0.005, 0.03)  # jitter: concurrent retries do not align
        if remaining() < backoff + 0.1 or not self.retry_budget.try_retry():
            return False
        time.sleep(backoff)
        return True

    def _attempt(self, method: str, path: str, params: Mapping[str, str] | None,
                 headers: Mapping[str, str] | None, json_body: Any, ok_statuses: tuple[int, ...],
                 left: float) -> tuple[int, Any]:
        target = path + "?" + urlencode(params) if params else path
        # Our name in the upstream's logs (a pool's default headers apply only to calls without any).
        headers = {"User-Agent": USER_AGENT, **(headers or {})}
        request_id = current_request_id()
        if request_id:
            headers["X-Request-Id"] = request_id  # lets the upstream's logs be matched with ours
        body = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        # One budget for connect, headers and body together (transport.py), cut at the deadline.
        budget = min(left, self.timeout[0] + self.timeout[1])
        timeout = urllib3.Timeout(connect=min(self.timeout[0], budget), read=min(self.timeout[1], budget))
        with call_deadline(budget):
            status, content, retry_after = self._exchange(method, target, body, headers, timeout)
        if status not in ok_statuses:
            self.raise_for_status(status, retry_after)
        return self._parse(status, content)

    def _exchange(self, method: str, target: str, body: bytes | None, headers: dict[str, str],
                  timeout: urllib3.Timeout) -> tuple[int, bytes, str | None]:
        """Send the request for `target` (path and query below the base URL) and read the
        answer (status, capped body, Retry-After)."""
        try:
            response = self.origin.urlopen(method, target, body=body, headers=headers, timeout=timeout,
                                           preload_content=False, redirect=False, retries=False)
        except urllib3.exceptions.NewConnectionError:
            # Refused or unresolvable (urllib3 files this under timeouts, for history's sake).
            raise _Retryable(UpstreamUnavailable(self.name, f"{self.name} could not be reached")) from None
        except urllib3.exceptions.TimeoutError:
            self.breaker.failure()
            raise UpstreamTimeout(self.name, f"{self.name} did not answer in time") from None
        except urllib3.exceptions.HTTPError:
            raise _Retryable(UpstreamUnavailable(self.name, f"{self.name} could not be reached")) from None
        try:
            status = response.status
            content = self._read_capped(response)
        except urllib3.exceptions.TimeoutError:
            self.breaker.failure()
            raise UpstreamTimeout(self.name, f"{self.name} did not answer in time") from None
        except urllib3.exceptions.HTTPError:
            raise _Retryable(UpstreamUnavailable(self.name, f"{self.name} broke the connection")) from None
        except UpstreamBadAnswer:
            self.breaker.failure()
            raise
        finally:
            response.release_conn()
        return status, content, response.headers.get("Retry-After")

    def _parse(self, status: int, content: bytes) -> tuple[int, Any]:
        try:
            parsed = _DECODER.decode(content.decode("utf-8")) if content else None
        except RecursionError:
            self.breaker.failure()
            raise self._too_deep(status) from None
        except ValueError:
            if not 200 <= status < 300:
                # An expected error status (e.g. 404) may come with any body: the status says it.
                self.breaker.success()
                return status, None
            self.breaker.failure()
            raise UpstreamBadAnswer(
                self.name, f"{self.name} answered with something that is not JSON",
                upstream_status=status,
            ) from None
        if nesting_exceeds(parsed, MAX_DEPTH):
            self.breaker.failure()
            raise self._too_deep(status)
        if _lone_surrogates(content, parsed):
            self.breaker.failure()
            raise UpstreamBadAnswer(self.name, f"{self.name} answered with text that is not Unicode",
                                    upstream_status=status)
        self.breaker.success()
        return status, parsed

    def _too_deep(self, status: int) -> UpstreamBadAnswer:
        return UpstreamBadAnswer(self.name, f"{self.name} answered with JSON nested deeper than "
                                 f"{MAX_DEPTH} levels", upstream_status=status)

    def _read_capped(self, response: urllib3.BaseHTTPResponse) -> bytes:
        # Read at most max_bytes + 1 so a huge body is refused without buffering it all.
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            response.drain_conn()
            raise UpstreamBadAnswer(self.name, f"{self.name} answered with an oversized body")
        content = response.read(self.max_bytes + 1)
        if len(content) > self.max_bytes:
            raise UpstreamBadAnswer(self.name, f"{self.name} answered with an oversized body")
        return content

    def raise_for_status(self, status: int, retry_after: str | None) -> None:
        """Map an unexpected HTTP status to a typed error (and tell the breaker and limiter);
        messages never carry secrets."""
        if status == 503 and retry_after:
            # Overloaded and saying for how long: honour it like a 429 (pause, no retry).
            seconds = retry_after_seconds(retry_after)
            self.breaker.failure()
            self.pauses += 1
            self.limiter.pause(seconds)
            raise UpstreamUnavailable(self.name, f"{self.name} is unavailable and asked the proxy to "
                                      "wait; try again later", upstream_status=status, retry_after=seconds)
        if status in (502, 503, 504):
            raise _Retryable(UpstreamUnavailable(
                self.name, f"{self.name} failed with HTTP {status}", upstream_status=status
            ))
        if status >= 500:
            self.breaker.failure()
        else:
            # The upstream is up and answering: a 4xx says nothing about its health.
            self.breaker.success()
        if status in (401, 403):
            raise UpstreamAuthError(
                self.name, f"{self.name} refused the proxy's credentials", upstream_status=status
            )
        if status == 429:
            # Paused for the time it asked, configured rate limit or not (deployment-wide on Redis).
            self.pauses += 1
            self.limiter.pause(retry_after_seconds(retry_after))
            raise UpstreamRateLimited(
                self.name,
                f"{self.name} is rate limiting the proxy; try again later",
                upstream_status=status,
                retry_after=retry_after_seconds(retry_after),
            )
        if status >= 500:
            raise UpstreamUnavailable(
                self.name, f"{self.name} failed with HTTP {status}", upstream_status=status
            )
        raise UpstreamError(
            self.name, f"{self.name} answered with unexpected HTTP {status}", upstream_status=status
        )
