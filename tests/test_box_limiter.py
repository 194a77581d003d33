"""One rate limit and one Retry-After pause per upstream for the workers of a machine
(proxy/box_limiter.py): two limiters on one box file stand for two worker processes; the
live test runs `ccproxy serve --workers 2` against the sandbox and counts upstream calls."""

from __future__ import annotations

import pytest
import requests
from ccproxy_serve import serving
from conftest import FakeClock, upstream_calls

from proxy.box_cache import BoxStore, prepare
from proxy.box_limiter import BoxRateLimiter
from proxy.cache import MemoryStore
from proxy.errors import UpstreamRateLimited
from proxy.guards import RateLimiter


def workers(tmp_path, clock, per_minute: float, count: int = 2, path: str = "") -> list[BoxRateLimiter]:
    """`count` workers' limiters for one upstream, sharing one box file; each has its 1/N share
    as the fallback, as `services.upstream_guards` builds them."""
    if not path:
        path = str(tmp_path / "box.sqlite3")
        prepare(path)
    return [BoxRateLimiter("amplitude", per_minute, BoxStore(path, MemoryStore(10, clock), clock),
                           RateLimiter("amplitude", per_minute / count, clock)) for _ in range(count)]


def taken(limiter: BoxRateLimiter, times: int) -> int:
    calls = 0
    for _ in range(times):
        try:
            limiter.acquire()
            calls += 1
        except UpstreamRateLimited:
            pass
    return calls


def test_one_worker_may_spend_the_whole_box_budget_and_then_every_worker_waits(tmp_path):
    clock = FakeClock()
    a, b = workers(tmp_path, clock, per_minute=60)  # a burst of 10, then 50 more over a minute
    assert taken(a, 25) == 10  # per process it would have been 5: half the budget unused
    with pytest.raises(UpstreamRateLimited) as refused:
        b.acquire()  # b never called: the bucket is the box's
    assert refused.value.retry_after == 2  # (1 token) / (50 per 60 s), rounded up
    assert (a.state["rejected"], b.state["rejected"]) == (15, 1)
    clock.advance(60)
    assert taken(a, 5) + taken(b, 10) == 10  # refilled to its burst, not past it
    assert a.state["per_minute"] == 60 and a.state["shared"] is True and a.state["scope"] == "box"


def test_no_minute_exceeds_the_limit_however_the_calls_are_spread(tmp_path):
    clock = FakeClock()
    limiters = workers(tmp_path, clock, per_minute=60, count=3)
    calls = 0
    for _ in range(600):  # 60 s in steps of 0.1 s, every worker trying each step
        calls += sum(taken(limiter, 1) for limiter in limiters)
        clock.advance(0.1)
    assert 59 <= calls <= 60


def test_an_upstreams_pause_stops_every_worker_and_is_never_shortened(tmp_path):
    clock = FakeClock()
    a, b = workers(tmp_path, clock, per_minute=0)  # no limit: only pauses refuse
    assert taken(b, 100) == 100  # and no token is spent
    a.pause(30)  # a got a 429 with Retry-After: 30
    b.pause(5)  # a shorter pause seen later does not end the longer one
    with pytest.raises(UpstreamRateLimited) as refused:
        b.acquire()
    assert refused.value.retry_after == 30
    assert b.paused_for() == 30  # remembered in b: its next calls ask the box nothing
    assert b.state["paused"] is True and b.state["paused_for"] == 30
    clock.advance(30)
    assert taken(a, 1) == taken(b, 1) == 1


def test_a_box_that_cannot_be_written_falls_back_to_each_workers_share(tmp_path):
    clock = FakeClock()
    a, b = workers(tmp_path, clock, per_minute=60, path="/dev/null/box.sqlite3")
    assert taken(a, 25) == 5 and taken(b, 25) == 5  # 1/2 of the limit each, as before the box
    assert a.box.degraded  # counted, and /readyz says so (box_cache_unusable)


def test_two_workers_share_one_budget_live(sandboxes, tmp_path):
    """All requests on one kept-alive connection reach one worker: with the limit split per
    process it could spend only half the budget; the box's bucket gives it the whole burst."""
    env = {"CCPROXY_RATE_LIMIT_AMPLITUDE": "60", "CCPROXY_REQUEST_DEADLINE": "20",
           "CCPROXY_UPSTREAM_READ_TIMEOUT": "10"}
    with serving(sandboxes, tmp_path / "serve.log", env, workers=2) as (base, _proc):
        with requests.Session() as session:
            answers = [session.get(f"{base}/v1/amplitude/recommendations?rec_id=testRecId&user_id=budget{i}",
                                   timeout=30) for i in range(20)]
    assert [a.status_code for a in answers] == [200] * 20
    assert sum(a.json()["found"] for a in answers) == 10  # the burst: 60 a minute / 6
    assert sum(bool(a.json().get("fallback")) for a in answers) == 10  # "none for now", not a 503
    assert upstream_calls(sandboxes, "amplitude") == 10


def test_a_worker_whose_clock_reading_is_late_gets_no_extra_calls(tmp_path):
    """A worker reads the clock, then waits (a busy file, a yield) while another takes a token
    later: its write must not move the bucket's time back and credit that interval twice."""
    clock = FakeClock()
    path = str(tmp_path / "box.sqlite3")
    prepare(path)

    def limiter(lag: float) -> BoxRateLimiter:
        def late() -> float:
            return clock() - lag
        return BoxRateLimiter("amplitude", 60, BoxStore(path, MemoryStore(10, late), late),
                              RateLimiter("amplitude", 30, late))

    on_time, late = limiter(0.0), limiter(0.5)
    calls = []
    for _ in range(600):  # 60 s in steps of 0.1 s
        for worker in (on_time, late):
            calls += [clock()] * taken(worker, 1)
        clock.advance(0.1)
    assert max(sum(1 for t in calls if start <= t < start + 60) for start in calls) <= 60


def test_a_busy_box_refuses_rather_than_adding_the_local_share(tmp_path, monkeypatch):
    """Busy past its retries is contention, not a broken file: this worker's 1/N share would
    come on top of the box's budget."""
    from proxy import box_cache

    clock = FakeClock()
    a, b = workers(tmp_path, clock, per_minute=60)
    monkeypatch.setattr(box_cache, "BUSY_TRIES", 1)
    holder = __import__("sqlite3").connect(a.box.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    try:
        with pytest.raises(UpstreamRateLimited) as refused:
            a.acquire()
        assert refused.value.retry_after == 1 and a.box.usable
        assert a.local.tokens == a.local.capacity  # the local share was not spent either
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert taken(a, 1) == 1
