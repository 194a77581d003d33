"""The shared cache and rate limits on a real redis-server."""

from __future__ import annotations

import subprocess

import pytest
import redis
from conftest import upstream_calls
from servers import wait_for

from proxy import config, create_app

RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="


@pytest.fixture
def shared_app(sandboxes, redis_server):
    redis_server["client"].flushdb()

    def build(**overrides):
        settings = config.load(
            overrides={**sandboxes.proxy_settings(), "redis_url": redis_server["url"], **overrides},
            environ={},
        )
        return create_app(settings)

    return build


def test_two_instances_share_one_cache(shared_app, sandboxes):
    first, second = shared_app().test_client(), shared_app().test_client()
    a = first.get(RECS + "shared1")
    b = second.get(RECS + "shared1")
    assert a.headers["X-Cache"] == "MISS" and b.headers["X-Cache"] == "HIT"
    assert a.get_json()["items"] == b.get_json()["items"]
    assert upstream_calls(sandboxes) == 1


def test_values_are_json_not_pickle_and_keys_hold_no_secret(shared_app, redis_server):
    shared_app().test_client().get(RECS + "shared2")
    keys = [k.decode() for k in redis_server["client"].keys("ccproxy:*")]
    assert keys and all("sandbox-amplitude-secret" not in k for k in keys)
    value = redis_server["client"].get(next(k for k in keys if "userprofile" in k))
    assert value.startswith(b"{")


def test_negative_ttl_in_redis(shared_app, redis_server):
    shared_app(cache_ttl_negative=7).test_client().get(RECS + "unknown-r1")
    key = next(k for k in redis_server["client"].keys("ccproxy:*") if b"unknown-r1" in k)
    ttl_ms = redis_server["client"].pttl(key)
    assert 0 < ttl_ms <= (7 + 3600) * 1000  # TTL plus the stale window, not the 300 s of a hit


def test_rate_limit_is_shared_across_instances(shared_app, sandboxes):
    apps = [shared_app(rate_limit_amplitude=12, cache_max_stale=0, recommendations_rate_limit_fallback=False)
            .test_client() for _ in range(3)]
    statuses = [apps[i % 3].get(RECS + f"rlshared{i}").status_code for i in range(4)]
    assert statuses.count(200) == 2 and statuses.count(503) == 2  # a burst of 2 for everyone
    assert upstream_calls(sandboxes) == 2


def test_coalescing_across_instances_through_the_lock(shared_app, sandboxes):
    import threading

    sandboxes.state("amplitude").latency = 0.3
    try:
        apps = [shared_app().test_client() for _ in range(4)]
        results = []
        threads = [threading.Thread(target=lambda c=c: results.append(c.get(RECS + "lock1"))) for c in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    finally:
        sandboxes.state("amplitude").latency = 0
    assert upstream_calls(sandboxes) == 1
    assert len({r.get_data() for r in results}) == 1


def test_redis_outage_keeps_answering_and_is_reported(sandboxes, tmp_path):
    import shutil
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, socket_timeout=5)
        wait_for(lambda: _pings(probe), what="redis-server answering")
        settings = config.load(overrides={**sandboxes.proxy_settings(),
                                          "redis_url": f"redis://127.0.0.1:{port}/0"}, environ={})
        client = create_app(settings).test_client()
        assert client.get("/readyz").get_json()["cache"] == {"backend": "redis", "reachable": True, "entries": 0}
        assert client.get(RECS + "outage1").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    r = client.get(RECS + "outage2")
    assert r.status_code == 200 and r.get_json()["item_count"] == 5
    ready = client.get("/readyz").get_json()
    assert ready["cache"]["reachable"] is False and ready["degraded"] is True


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_no_lock_once_the_last_holder_stored_the_answer(redis_server):
    """A worker that missed just before another stored the entry and let go of the lock (a
    busy machine can deschedule it for a whole upstream call) must not call again."""
    from proxy.cache import Entry, MemoryStore
    from proxy.clients.base import Answer
    from proxy.redis_backend import RedisHealth, RedisStore

    redis_server["client"].flushdb()
    store = RedisStore(RedisHealth(redis.Redis.from_url(redis_server["url"])), MemoryStore(10))
    assert store.get("k") is None  # this worker's miss
    holder = store.try_lock("k")  # the other worker leads, stores, lets go
    assert holder is not None
    store.put("k", Entry(Answer({"v": 1}), __import__("time").time(), 60, 0))
    store.unlock("k", holder)
    assert store.try_lock("k") is None  # fresh: read it, no second upstream call
    assert redis_server["client"].get("ccproxy:lock:k") is None  # and no lock left behind


def test_instances_whose_clocks_are_apart_share_one_budget(redis_server, monkeypatch):
    """Two instances 100 s apart on the wall clock, calling in turn: the bucket keeps Redis's
    own time, so no instance is credited the other's skew (it let 3,099 calls through a
    600/min limit at 100 ms apart)."""
    import time
    import types

    from proxy import redis_backend
    from proxy.errors import UpstreamRateLimited
    from proxy.guards import RateLimiter
    from proxy.redis_backend import RedisHealth, RedisRateLimiter

    redis_server["client"].flushdb()
    turn = iter(range(10**6))
    skewed = types.SimpleNamespace(time=lambda: time.time() + (100 if next(turn) % 2 else -100),
                                   monotonic=time.monotonic)
    monkeypatch.setattr(redis_backend, "time", skewed)
    instances = [RedisRateLimiter("amplitude", 60, RedisHealth(redis.Redis.from_url(redis_server["url"])),
                                  RateLimiter("amplitude", 30)) for _ in range(2)]
    started, allowed = time.monotonic(), 0
    for i in range(200):
        try:
            instances[i % 2].acquire()
            allowed += 1
        except UpstreamRateLimited:
            pass
    elapsed = time.monotonic() - started
    limiter = instances[0]
    assert allowed <= limiter.capacity + limiter.refill * elapsed + 1, (allowed, elapsed)


def test_with_redis_each_hit_is_shaped_from_a_fresh_answer_and_reads_the_same(shared_app, sandboxes, monkeypatch):
    """README, Cache: with Redis every hit decodes its answer afresh, so no bytes are kept
    (and no kept bytes can go stale against what Redis holds); the answers read the same."""
    from proxy.shape import amplitude as amplitude_shape

    calls = []
    real = amplitude_shape.recommendations
    monkeypatch.setattr(amplitude_shape, "recommendations", lambda *a: calls.append(1) or real(*a))
    client = shared_app().test_client()
    answers = [client.get(RECS + "redis-kept") for _ in range(3)]
    assert [a.headers["X-Cache"] for a in answers] == ["MISS", "HIT", "HIT"]
    assert len({a.data for a in answers}) == 1 and upstream_calls(sandboxes) == 1
    assert len(calls) == 3
