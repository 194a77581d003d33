"""Fault injection over loopback: stale answers, deadlines, retries, breaker, rate shaping, fallbacks."""

from __future__ import annotations

import time

import pytest
from conftest import FakeClock, upstream_calls

from proxy.errors import UpstreamRateLimited
from proxy.guards import CircuitBreaker, CircuitOpen, RateLimiter, RetryBudget

RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="


def services_of(client):
    return client.application.extensions["ccproxy"]


def test_stale_if_error_serves_last_good_answer_with_age(make_app, sandboxes, clock):
    client = make_app(cache_grace=0, cache_max_stale=600).test_client()
    good = client.get(RECS + "stale1").get_json()
    clock.advance(400)  # past the 300 s TTL
    sandboxes.state("amplitude").set_fault("error")
    r = client.get(RECS + "stale1")
    assert r.status_code == 200 and r.headers["X-Cache"] == "STALE" and r.headers["Age"] == "400"
    body = r.get_json()
    assert body["stale"] is True and body["items"] == good["items"]
    assert r.headers["Cache-Control"] == "max-age=0"
    clock.advance(600)  # beyond max staleness: nothing to serve
    assert client.get(RECS + "stale1").status_code == 503


def test_failed_background_refresh_keeps_the_good_entry(make_app, sandboxes, clock):
    client = make_app(cache_grace=60).test_client()
    first = client.get(RECS + "keep1").get_json()
    clock.advance(310)
    sandboxes.state("amplitude").set_fault("error")
    stale = client.get(RECS + "keep1")
    assert stale.headers["X-Cache"] == "STALE"
    services_of(client).cache.drain()
    again = client.get(RECS + "keep1")
    assert again.headers["X-Cache"] == "STALE" and again.get_json()["items"] == first["items"]


def test_negative_answers_use_the_negative_ttl(make_app, sandboxes, clock):
    client = make_app(cache_ttl_negative=5, cache_grace=0).test_client()
    r = client.get(RECS + "unknown-n1")
    assert r.get_json()["found"] is False and r.headers["Cache-Control"] == "max-age=5"
    clock.advance(6)
    assert client.get(RECS + "unknown-n1").headers["X-Cache"] == "MISS"


def test_deadline_bounds_a_hanging_upstream(make_app, sandboxes):
    client = make_app(request_deadline=0.4, upstream_read_timeout=5).test_client()
    sandboxes.state("amplitude").set_fault("hang", seconds=20, count=1)
    started = time.monotonic()
    r = client.get(RECS + "hang1")
    # Cut by the deadline, not by the upstream: far less than its 20 s hang (loose on purpose).
    assert time.monotonic() - started < 10
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_timeout"


def test_reset_connection_is_retried_once(client, sandboxes):
    sandboxes.state("amplitude").set_fault("reset", count=1)
    r = client.get(RECS + "retry1")
    assert r.status_code == 200 and upstream_calls(sandboxes) == 2


def test_500_is_not_retried(client, sandboxes):
    sandboxes.state("amplitude").set_fault("error", count=1)
    assert client.get(RECS + "noretry").status_code == 503
    assert upstream_calls(sandboxes) == 1


def test_breaker_opens_fails_fast_and_recovers(make_app, sandboxes, clock):
    client = make_app(breaker_threshold=3, breaker_reset=10, cache_max_stale=0).test_client()
    sandboxes.state("amplitude").set_fault("error")
    for i in range(3):
        assert client.get(RECS + f"b{i}").status_code == 503
    assert upstream_calls(sandboxes) == 3
    r = client.get(RECS + "b-open")
    assert r.get_json()["error"]["code"] == "upstream_circuit_open" and int(r.headers["Retry-After"]) >= 1
    assert upstream_calls(sandboxes) == 3  # failed fast
    sandboxes.state("amplitude").set_fault("none")
    clock.advance(10)
    assert client.get(RECS + "b-probe").status_code == 200  # the half-open probe closes it
    assert services_of(client).amplitude.breaker.state == "closed"


def test_breaker_unit_half_open_allows_one_probe():
    clock = FakeClock()
    breaker = CircuitBreaker("x", threshold=1, reset_after=5, timer=clock)
    breaker.failure()
    with pytest.raises(CircuitOpen):
        breaker.allow()
    clock.advance(5)
    breaker.allow()  # the probe
    with pytest.raises(CircuitOpen):
        breaker.allow()  # others fail fast meanwhile
    breaker.failure()  # probe failed: open again
    assert breaker.state == "open"


def test_rate_limiter_never_exceeds_the_limit_in_any_minute():
    clock = FakeClock()
    limiter = RateLimiter("amplitude", 600, timer=clock)
    granted = []
    for _ in range(60 * 50):  # 3 minutes in 20 ms steps, asking for a call each step (3000/min)
        clock.advance(0.06)
        try:
            limiter.acquire()
            granted.append(clock.now)
        except UpstreamRateLimited as limited:
            assert limited.retry_after >= 1
    # Sliding 60 s windows over every grant: never more than 600.
    j = 0
    for i, t in enumerate(granted):
        while granted[j] <= t - 60:
            j += 1
        assert i - j + 1 <= 600
    assert len(granted) > 1400  # and close to the limit: 3 min x 600 minus the initial burst


def test_rate_limit_rejects_at_once_without_calling(make_app, sandboxes):
    client = make_app(rate_limit_amplitude=12, cache_max_stale=0,  # burst of 2
                      recommendations_rate_limit_fallback=False).test_client()
    assert [client.get(RECS + f"rl{i}").status_code for i in range(3)] == [200, 200, 503]
    r = client.get(RECS + "rl9")
    assert r.get_json()["error"]["code"] == "upstream_rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert upstream_calls(sandboxes) == 2


def test_rate_limit_is_split_across_workers():
    from proxy import config

    settings = config.load(overrides={"workers": 4}, environ={})
    assert settings.rate_limit("amplitude") == 150


def test_upstream_429_pauses_the_upstream(make_app, sandboxes, clock):
    client = make_app(cache_max_stale=0, recommendations_rate_limit_fallback=False).test_client()
    sandboxes.state("amplitude").set_fault("ratelimit", count=1)  # Retry-After: 30
    assert client.get(RECS + "p1").status_code == 503
    r = client.get(RECS + "p2")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_rate_limited"
    assert upstream_calls(sandboxes) == 1  # paused: no call made
    clock.advance(31)
    assert client.get(RECS + "p3").status_code == 200


def test_retry_budget_caps_extra_calls():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, floor=3, window=10, timer=clock)
    for _ in range(100):
        budget.record_call()
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed == 23  # 3 + 20% of 100


FALLBACKS = """
["/v1/amplitude/recommendations"]
items = ["Gift card", "Best seller"]

["/v1/experiment/variants"]
variants = { hero-banner = "spring-sale" }
payloads = { hero-banner = { headline = "Default hero" } }
"""


def test_fallback_answers_200_so_the_email_renders(make_app, sandboxes, tmp_path):
    path = tmp_path / "fallbacks.toml"
    path.write_text(FALLBACKS)
    client = make_app(fallbacks_file=str(path), cache_max_stale=0).test_client()
    sandboxes.state("amplitude").set_fault("error")
    r = client.get(RECS + "fb1")
    assert r.status_code == 200 and r.headers["X-Cache"] == "FALLBACK"
    body = r.get_json()
    assert body["fallback"] is True and body["item_1"] == "Gift card" and body["source"] == "fallback"
    sandboxes.state("experiment").set_fault("hang", seconds=3)
    exp = make_app(fallbacks_file=str(path), request_deadline=0.3).test_client().get(
        "/v1/experiment/variants?user_id=u&flag_keys=hero-banner,other"
    ).get_json()
    assert exp["fallback"] is True
    assert exp["variants"] == {"hero_banner": "spring-sale", "other": "off"}
    assert exp["payloads"]["hero_banner"] == {"headline": "Default hero"}
    sandboxes.state("experiment").set_fault("none")
    # A fallback is never cached: the next call goes upstream again.
    sandboxes.state("amplitude").set_fault("none")
    assert client.get(RECS + "fb1").headers["X-Cache"] == "MISS"


def test_without_fallback_it_is_503_with_retry_after(client, sandboxes):
    sandboxes.state("amplitude").set_fault("malformed", count=1)
    r = client.get(RECS + "nofb")
    assert r.status_code == 503 and r.headers["Retry-After"] and r.get_json()["ok"] is False
