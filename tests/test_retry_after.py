"""Retry-After honoured everywhere (issue 11, point 4): a 429, or a 503 with Retry-After, from
any upstream pauses calls to it for the time it asked, rate limit configured or not; with
Redis the pause is deployment-wide, so a process that never saw the 429 pauses too."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
import requests
from ccproxy_serve import serving
from conftest import upstream_calls
from servers import wait_for

from proxy import config, create_app
from proxy.clients.base import retry_after_seconds

# One read endpoint per upstream; Experiment, Target and mediarithmics have no rate limit
# by default, which is where a 429 used to pause nothing.
PATHS = {
    "amplitude": "/v1/amplitude/properties?user_id=",
    "experiment": "/v1/experiment/variants?flag_keys=hero-banner&track=false&user_id=",
    "target": "/v1/adobe-target/profile?third_party_id=",
    "mediarithmics": "/v1/mediarithmics/choices?user_point_id=",
}


@pytest.mark.parametrize("upstream", list(PATHS))
@pytest.mark.parametrize("fault", ["ratelimit", "unavailable"])
def test_retry_after_pauses_every_upstream(make_app, sandboxes, clock, upstream, fault):
    client = make_app(cache_max_stale=0).test_client()
    sandboxes.state(upstream).set_fault(fault, 40, count=1)  # 429/503 with Retry-After: 40
    first = client.get(PATHS[upstream] + "pause-0")
    assert first.status_code == 503 and first.headers["Retry-After"] == "40"
    expected = "upstream_rate_limited" if fault == "ratelimit" else "upstream_unavailable"
    assert first.get_json()["error"]["code"] == expected
    assert upstream_calls(sandboxes, upstream) == 1  # a 503 that says when is not retried at once
    clock.advance(15)
    for i in range(1, 11):
        r = client.get(PATHS[upstream] + f"pause-{i}")
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_rate_limited"
        assert r.headers["Retry-After"] == "25"  # what is left of the pause
    assert upstream_calls(sandboxes, upstream) == 1  # 10 requests, no call
    ready = client.get("/readyz").get_json()
    assert {"code": "upstream_paused", "component": f"upstream:{upstream}"}.items() <= ready["reasons"][0].items()
    clock.advance(26)
    assert client.get(PATHS[upstream] + "pause-after").status_code == 200
    assert upstream_calls(sandboxes, upstream) == 2


def test_paused_upstream_serves_stale_and_fallback(make_app, sandboxes, clock, tmp_path):
    fallbacks = tmp_path / "fallbacks.toml"
    fallbacks.write_text('["/v1/adobe-target/profile"]\nprofile = { "user.memberlevel" = "member" }\n')
    client = make_app(cache_grace=0, cache_max_stale=600, cache_ttl_target_profile=10,
                      fallbacks_file=str(fallbacks)).test_client()
    good = client.get(PATHS["target"] + "a1-mbox3rdPartyId").get_json()
    sandboxes.state("target").set_fault("ratelimit", 60, count=1)
    assert client.get(PATHS["target"] + "pause-fb-0").get_json()["fallback"] is True  # the 429
    clock.advance(20)  # past the cached answer's TTL, inside the pause
    stale = client.get(PATHS["target"] + "a1-mbox3rdPartyId")
    assert stale.status_code == 200 and stale.headers["X-Cache"] == "STALE"
    assert stale.get_json()["profile"] == good["profile"]
    fallback = client.get(PATHS["target"] + "pause-fb-1")
    assert fallback.status_code == 200 and fallback.get_json()["profile"] == {"user_memberlevel": "member"}
    assert upstream_calls(sandboxes, "target") == 2  # the first answer and the 429


def test_retry_after_forms():
    assert retry_after_seconds("17") == 17
    assert retry_after_seconds("2.5") == 3
    in_a_minute = formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_seconds(in_a_minute) <= 61  # the HTTP-date form (RFC 9110)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 1  # in the past: at least 1 s
    assert retry_after_seconds("soon") == 1 and retry_after_seconds(None, default=5) == 5
    assert retry_after_seconds("nan") == 1 and retry_after_seconds("999999") == 3600


@pytest.fixture
def shared(sandboxes, redis_server):
    redis_server["client"].flushdb()

    def build(**overrides):
        settings = config.load(overrides={**sandboxes.proxy_settings(), "redis_url": redis_server["url"],
                                          "cache_max_stale": 0, **overrides}, environ={})
        return create_app(settings).test_client()

    yield build
    redis_server["client"].flushdb()


@pytest.mark.parametrize("fault", ["ratelimit", "unavailable"])
def test_pause_is_shared_through_redis(shared, sandboxes, fault):
    first, second = shared(), shared()  # two processes' worth of state, one Redis
    sandboxes.state("experiment").set_fault(fault, 30, count=1)
    assert first.get(PATHS["experiment"] + "shared-0").status_code == 503
    for i in range(1, 6):  # the instance that never saw the 429/503
        r = second.get(PATHS["experiment"] + f"shared-{i}")
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert upstream_calls(sandboxes, "experiment") == 1
    assert second.get("/readyz").get_json()["upstreams"]["experiment"]["limiter"]["paused"] is True
    # Other upstreams are not paused.
    assert second.get(PATHS["target"] + "a1-mbox3rdPartyId").status_code == 200


def test_a_shorter_retry_after_never_shortens_a_pause(shared, sandboxes, redis_server):
    client = shared()
    services = client.application.extensions["ccproxy"]
    services.experiment.limiter.pause(50)
    services.experiment.limiter.pause(2)
    assert redis_server["client"].pttl("ccproxy:pause:experiment") > 40_000


@pytest.fixture
def served_with_redis(sandboxes, redis_server, tmp_path):
    redis_server["client"].flushdb()
    env = {"CCPROXY_CACHE_MAX_STALE": "0", "CCPROXY_REDIS_URL": redis_server["url"]}
    try:
        with serving(sandboxes, tmp_path / "serve.log", env) as (base, _proc):
            yield base
    finally:
        redis_server["client"].flushdb()


def test_pause_holds_in_the_worker_that_never_saw_the_429(served_with_redis, sandboxes):
    """`ccproxy serve` with two gevent workers and Redis: one keep-alive connection per
    worker (each worker tells its pid on /readyz); the 429 reaches one, the other pauses."""
    base = served_with_redis
    sessions: dict[int, requests.Session] = {}

    def both_hold_one() -> bool:  # new connections until both workers hold one (one may still boot)
        session = requests.Session()
        worker = session.get(base + "/readyz", timeout=10).json()["worker"]
        if sessions.setdefault(worker, session) is not session:
            session.close()
        return len(sessions) == 2

    wait_for(both_hold_one, seconds=90, poll=0.2, what="both workers accepting a connection")
    (saw, _), (other, other_session) = sessions.items()
    sandboxes.state("target").set_fault("ratelimit", 30, count=1)
    r = sessions[saw].get(base + PATHS["target"] + "served-0", timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "30"
    assert other_session.get(base + "/readyz", timeout=10).json()["worker"] == other
    for i in range(1, 6):
        r = other_session.get(base + PATHS["target"] + f"served-{i}", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert upstream_calls(sandboxes, "target") == 1
