"""What stands between a million-recipient send and an upstream: per-request deadlines,
a circuit breaker, a rate limiter and a retry budget (one of each per upstream).

All take an injectable clock; none sleeps or parks a thread to wait for capacity.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import CircuitOpen, UpstreamRateLimited, UpstreamTimeout

Timer = Callable[[], float]

# The monotonic time by which the current request must be answered (None: no deadline).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


def start_deadline(budget: float, timer: Timer = time.monotonic) -> contextvars.Token:
    """Give the current request `budget` seconds in all (Braze waits 2 s)."""
    return _deadline.set(timer() + budget)


def end_deadline(token: contextvars.Token) -> None:
    _deadline.reset(token)


def remaining(timer: Timer = time.monotonic) -> float:
    """Seconds left in the current request's budget (inf without one)."""
    deadline = _deadline.get()
    return math.inf if deadline is None else deadline - timer()


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures; open fails fast for `reset_after`
    seconds; then half-open lets one probe through, whose outcome closes or reopens it."""

    def __init__(self, upstream: str, threshold: int = 5, reset_after: float = 10.0,
                 timer: Timer = time.monotonic):
        self.upstream = upstream
        self.threshold = threshold
        self.reset_after = reset_after
        self.timer = timer
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.timer() - self.opened_at >= self.reset_after else "open"

    def allow(self) -> None:
        """Raise CircuitOpen unless a call may go to the upstream now."""
        with self._lock:
            if self.opened_at is None:
                return
            waited = self.timer() - self.opened_at
            if waited < self.reset_after:
                retry = max(1, math.ceil(self.reset_after - waited))
                raise CircuitOpen(self.upstream, f"{self.upstream} is failing; not calling it for now",
                                  retry_after=retry)
            if self.probing:
                raise CircuitOpen(self.upstream, f"{self.upstream} is being probed; try again shortly",
                                  retry_after=1)
            self.probing = True

    def success(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.probing or self.failures >= self.threshold:
                self.opened_at = self.timer()
            self.probing = False

    def release(self) -> None:
        """A call ended without telling health (e.g. a 404): let the next probe through."""
        with self._lock:
            self.probing = False


class Limiter(Protocol):
    def acquire(self) -> None: ...

    def pause(self, seconds: float) -> None: ...

    def paused_for(self) -> float: ...

    @property
    def state(self) -> dict: ...


def paused_error(upstream: str, wait: float) -> UpstreamRateLimited:
    """What a call gets while `upstream` is paused by its own Retry-After (no call is made):
    the remaining pause as Retry-After."""
    return UpstreamRateLimited(upstream, f"{upstream} asked the proxy to wait; try again later",
                               retry_after=max(1, math.ceil(wait)))


class RateLimiter:
    """A token bucket that keeps any 60-second window at or under `per_minute` calls.

    Capacity C = limit/6 with refill (limit - C)/60 per second: a burst of C, and at most
    C + 60 x refill = limit calls in any minute, so the proxy never causes a 429. An
    upstream's Retry-After (on a 429, or a 503 that sends one) pauses all calls to it for
    that long, limit or no limit, without parking threads: they fail fast. In memory, so
    per process; `redis_backend.RedisRateLimiter` shares limit and pause.
    """

    def __init__(self, upstream: str, per_minute: float, timer: Timer = time.monotonic):
        self.upstream = upstream
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute / 6) if per_minute > 0 else math.inf
        self.refill = (per_minute - self.capacity) / 60 if per_minute > 0 else math.inf
        self.tokens = self.capacity
        self.timer = timer
        self.updated = timer()
        self.paused_until = 0.0
        self.rejected = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self.timer()
            if now < self.paused_until:
                self.rejected += 1
                raise paused_error(self.upstream, self.paused_until - now)
            if self.per_minute <= 0:
                return
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            self.rejected += 1
            wait = (1 - self.tokens) / self.refill if self.refill > 0 else 60
            raise UpstreamRateLimited(
                self.upstream, f"the proxy's {self.upstream} call budget is spent; try again later",
                retry_after=max(1, math.ceil(wait)),
            )

    def pause(self, seconds: float) -> None:
        with self._lock:
            self.paused_until = max(self.paused_until, self.timer() + seconds)

    def paused_for(self) -> float:
        """Seconds left of a pause the upstream asked for (0 when not paused)."""
        return max(0.0, self.paused_until - self.timer())

    @property
    def state(self) -> dict:
        tokens = round(self.tokens, 2) if math.isfinite(self.tokens) else None  # None: no limit
        return {"per_minute": self.per_minute, "tokens": tokens,
                "paused": self.timer() < self.paused_until, "paused_for": math.ceil(self.paused_for()),
                "rejected": self.rejected}


class RetryBudget:
    """Envoy-style: retries may add at most `ratio` extra calls (plus a small floor) over a
    rolling window, so retries never multiply load on a struggling upstream."""

    def __init__(self, ratio: float = 0.2, floor: int = 3, window: float = 10.0,
                 timer: Timer = time.monotonic):
        self.ratio, self.floor, self.window, self.timer = ratio, floor, window, timer
        self.started = timer()
        self.calls = 0
        self.retries = 0
        self._lock = threading.Lock()

    def _roll(self) -> None:
        if self.timer() - self.started >= self.window:
            self.started, self.calls, self.retries = self.timer(), 0, 0

    def record_call(self) -> None:
        with self._lock:
            self._roll()
            self.calls += 1

    def try_retry(self) -> bool:
        with self._lock:
            self._roll()
            if self.retries < self.floor + self.ratio * self.calls:
                self.retries += 1
                return True
            return False


@dataclass(frozen=True, slots=True)
class Guards:
    """One upstream's guards, given to its client when the client is built."""

    breaker: CircuitBreaker
    limiter: Limiter
    retry_budget: RetryBudget


def check_time_left(upstream: str, minimum: float = 0.02, timer: Timer = time.monotonic) -> float:
    """Seconds left for an upstream call; raise UpstreamTimeout when it cannot be made in time."""
    left = remaining(timer)
    if left < minimum:
        raise UpstreamTimeout(upstream, f"no time left to call {upstream} within the deadline")
    return left
