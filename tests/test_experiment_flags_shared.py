"""Local experiment mode with Redis: one Flags API fetch per refresh interval for the whole
deployment, not one per worker process (issue 16)."""

from __future__ import annotations

import time

import requests
from test_experiment_local import SANDBOX_FLAGS, URL, set_flags

FLAGS_PATH = "/sdk/v2/flags"


def fetches(sandboxes) -> int:
    return sandboxes.state("experiment").paths[FLAGS_PATH]


def refreshed(app) -> None:
    store = app.extensions["ccproxy"].flag_store
    store.current()
    store.wait(30)


def test_processes_sharing_redis_make_one_fetch_per_refresh(make_app, sandboxes, redis_server, clock):
    redis_server["client"].flushdb()
    apps = [make_app(experiment_mode="local", redis_url=redis_server["url"]) for _ in range(3)]
    for app in apps:
        refreshed(app)
    assert fetches(sandboxes) == 1  # the first fetched and published, the others read Redis
    stores = [app.extensions["ccproxy"].flag_store for app in apps]
    assert all(s.state()["usable"] and s.refreshes == 1 for s in stores)
    # The deployment key is never a Redis key in clear.
    assert not any(b"sandbox-experiment" in key for key in redis_server["client"].keys("*"))
    # A change is picked up by every process within one refresh, from one fetch.
    killed = [{**flag, "segments": [{"variant": "off"}]} for flag in
              requests.get(f"{sandboxes.servers['experiment'].url}{FLAGS_PATH}?v=0", timeout=10, headers={
                  "Authorization": "Api-Key sandbox-experiment-deployment-key"}).json()]
    set_flags(sandboxes, killed)
    before = fetches(sandboxes)
    clock.advance(31)
    for app in apps:
        refreshed(app)
    assert fetches(sandboxes) == before + 1
    assert all(s.refreshes == 2 for s in stores)
    # Each keeps the age of the one fetch (the max age counts from it, not from the Redis read).
    assert {s.state()["age_seconds"] for s in stores} == {0.0}
    for app in apps:
        body = app.test_client().get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button&track=false")
        assert body.get_json()["variants"] == {"checkout_button": "off"}


def test_a_process_that_read_an_older_copy_refreshes_when_that_copy_is_due(make_app, sandboxes,
                                                                           redis_server, clock):
    """The copy's age counts, not the time of the read: a process that joined 20 s into the
    interval refreshes 10 s later, not a whole interval after its read."""
    redis_server["client"].flushdb()
    first = make_app(experiment_mode="local", redis_url=redis_server["url"])
    refreshed(first)
    clock.advance(20)
    late = make_app(experiment_mode="local", redis_url=redis_server["url"])
    refreshed(late)
    store = late.extensions["ccproxy"].flag_store
    assert fetches(sandboxes) == 1 and store.state()["age_seconds"] == 20.0
    clock.advance(11)
    refreshed(late)
    assert store.refreshes == 2 and store.state()["age_seconds"] == 0.0
    assert fetches(sandboxes) == 2


def test_without_a_reachable_redis_each_process_fetches_for_itself(make_app, sandboxes):
    dead = "redis://127.0.0.1:1/0"  # nothing listens: each process falls back to its own fetch
    apps = [make_app(experiment_mode="local", redis_url=dead) for _ in range(2)]
    for app in apps:
        refreshed(app)
    assert fetches(sandboxes) == 2
    assert all(app.extensions["ccproxy"].flag_store.state()["usable"] for app in apps)


def test_two_gevent_workers_with_redis_fetch_once_per_refresh_period(sandboxes, redis_server, tmp_path):
    from ccproxy_serve import serving
    from servers import wait_for

    redis_server["client"].flushdb()
    refresh = 1.0
    env = {"CCPROXY_EXPERIMENT_MODE": "local", "CCPROXY_EXPERIMENT_FLAG_REFRESH": str(refresh),
           "CCPROXY_EXPERIMENT_FLAG_MAX_AGE": "600", "CCPROXY_REDIS_URL": redis_server["url"]}
    refreshes: dict[int, int] = {}

    def probe() -> None:
        # A new connection each time, so the probes reach every worker; each starts a due refresh.
        body = requests.get(f"{base}/readyz", timeout=10).json()
        flags = body.get("experiment_flags", {})
        if flags.get("usable"):
            refreshes[body["worker"]] = flags["refreshes"]

    with serving(sandboxes, tmp_path / "serve.log", env, workers=2) as (base, _proc):
        wait_for(lambda: probe() or len(refreshes) == 2, seconds=90, poll=0.02,
                 what="both workers loading their flags")
        start, first = time.monotonic(), fetches(sandboxes)
        at_start = dict(refreshes)
        # Keep both workers busy refreshing for several periods.
        wait_for(lambda: probe() or (time.monotonic() - start > 8 * refresh
                                     and all(refreshes[w] >= at_start[w] + 3 for w in refreshes)),
                 seconds=120, poll=0.02, what="both workers refreshing several times")
        elapsed, made = time.monotonic() - start, fetches(sandboxes) - first
        worker_refreshes = sum(refreshes[w] - at_start[w] for w in refreshes)
        r = requests.get(f"{base}{URL}?user_id=treatment-1&flag_keys={','.join(SANDBOX_FLAGS)}&track=false",
                         timeout=10)
        assert r.json()["variants"]["checkout_button"] == "treatment"
    # One fetch per period for the deployment (plus the period under way); one per worker would
    # be about twice as many: every worker refresh but about half came from Redis.
    assert 1 <= made <= elapsed / refresh + 1, (made, elapsed)
    assert made * 2 <= worker_refreshes + 2, (made, worker_refreshes)
