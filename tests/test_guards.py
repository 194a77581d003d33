"""proxy/guards.py on a fake clock: the request deadline, the breaker's bookkeeping, the
limiter's pauses and the retry budget's window (the end-to-end behaviour through the
sandboxes is in test_resilience.py and test_retry_after.py)."""

from __future__ import annotations

import math

import pytest
from conftest import FakeClock

from proxy.errors import CircuitOpen, UpstreamRateLimited, UpstreamTimeout
from proxy.guards import (
    CircuitBreaker,
    RateLimiter,
    RetryBudget,
    check_time_left,
    end_deadline,
    remaining,
    start_deadline,
)


def test_a_deadline_counts_down_and_refuses_a_call_it_cannot_fit():
    clock = FakeClock()
    assert remaining(clock) == math.inf  # no request, no deadline
    token = start_deadline(2.0, clock)
    try:
        clock.advance(1.5)
        assert remaining(clock) == pytest.approx(0.5)
        assert check_time_left("amplitude", timer=clock) == pytest.approx(0.5)
        clock.advance(0.49)
        with pytest.raises(UpstreamTimeout):
            check_time_left("amplitude", timer=clock)  # 10 ms left: under the 20 ms minimum
    finally:
        end_deadline(token)
    assert remaining(clock) == math.inf


def test_the_breaker_opens_on_consecutive_failures_only():
    clock = FakeClock()
    breaker = CircuitBreaker("x", threshold=3, reset_after=10, timer=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between starts the count again
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.retry_after == 10
    clock.advance(4)
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.retry_after == 6  # what is left of the open time


def test_a_released_probe_lets_the_next_one_through():
    clock = FakeClock()
    breaker = CircuitBreaker("x", threshold=1, reset_after=5, timer=clock)
    breaker.failure()
    clock.advance(5)
    breaker.allow()  # the probe, which ends without saying anything of health (a 404)
    breaker.release()
    breaker.allow()  # not refused as "being probed" for good
    breaker.success()
    assert breaker.state == "closed"


def test_a_pause_refuses_every_call_even_without_a_limit_and_never_shortens():
    clock = FakeClock()
    limiter = RateLimiter("target", 0, timer=clock)
    for _ in range(100):
        limiter.acquire()  # no limit configured
    limiter.pause(30)
    limiter.pause(5)  # a shorter Retry-After later does not cut the first one short
    clock.advance(10)
    with pytest.raises(UpstreamRateLimited) as refused:
        limiter.acquire()
    assert refused.value.retry_after == 20
    assert limiter.state["paused"] is True and limiter.state["rejected"] == 1
    clock.advance(20)
    limiter.acquire()
    assert limiter.paused_for() == 0


def test_the_retry_budget_renews_with_its_window():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, floor=1, window=10, timer=clock)
    for _ in range(4):
        budget.record_call()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]  # 1 + 50% of 4
    clock.advance(10)
    assert budget.try_retry() is True  # a new window
