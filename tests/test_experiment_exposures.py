"""Exposure events of local experiment evaluation (issue 16): one `[Experiment] Exposure` per
user, flag and variant however often Braze renders the message, sent through the proxy's own
transport to the sandbox's HTTP V2 API (`/2/httpapi`)."""

from __future__ import annotations

import hashlib
import socket
import urllib.request

import requests
from test_experiment_local import local_app

from proxy.exposures import DAY_SECONDS

URL = "/v1/experiment/variants"


def received(sandboxes) -> list[dict]:
    url = sandboxes.servers["amplitude"].url
    with requests.Session() as session:
        session.trust_env = False  # the test itself must not follow the dead proxy set below
        return session.get(f"{url}/__sandbox/events", timeout=10).json()["events"]


def render(client, query: str) -> dict:
    r = client.get(f"{URL}?{query}")
    assert r.status_code == 200
    return r.get_json()


def test_three_renders_make_one_exposure_per_flag(make_app, sandboxes, clock):
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    for _ in range(3):  # HTML, plain text, AMP
        body = render(client, "user_id=treatment-exp-1&flag_keys=checkout-button,hero-banner")
        assert body["tracked"] is True and body["variants"]["checkout_button"] == "treatment"
    tracker.flush()
    events = received(sandboxes)
    assert sorted(e["event_properties"]["[Experiment] Flag Key"] for e in events) == [
        "checkout-button", "hero-banner"]
    checkout = next(e for e in events if e["event_properties"]["[Experiment] Flag Key"] == "checkout-button")
    assert checkout["event_type"] == "[Experiment] Exposure"
    assert checkout["user_id"] == "treatment-exp-1"
    assert checkout["event_properties"]["[Experiment] Variant"] == "treatment"
    assert checkout["user_properties"]["$set"] == {"[Experiment] checkout-button": "treatment"}
    # The insert_id is a hash of user, device, flag, variant and UTC day: no id in clear.
    digest = hashlib.sha256("\x1f".join(("treatment-exp-1", "", "checkout-button", "treatment")).encode())
    day = checkout["time"] // 1000 // DAY_SECONDS
    assert checkout["insert_id"] == hashlib.sha256(f"{digest.hexdigest()}\x1f{day}".encode()).hexdigest()[:40]
    assert "treatment-exp-1" not in checkout["insert_id"]
    assert sandboxes.state("experiment").paths["/v1/vardata"] == 0
    # Another user, or the same user later than the 24 h window, is another exposure.
    render(client, "user_id=treatment-exp-2&flag_keys=checkout-button")
    clock.advance(DAY_SECONDS + 1)
    store = app.extensions["ccproxy"].flag_store
    store.current()  # a day-old flag configuration is refreshed first (else: remote evaluation)
    store.wait(10)
    render(client, "user_id=treatment-exp-1&flag_keys=checkout-button")
    tracker.flush()
    assert len(received(sandboxes)) == 4
    assert tracker.counts["sent"] == 4 and tracker.counts["duplicate"] == 4
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'ccproxy_experiment_exposures_total{outcome="sent",worker=' in scrape


def test_untracked_and_unassigned_flags_send_nothing(make_app, sandboxes):
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    assert render(client, "user_id=treatment-exp-3&flag_keys=checkout-button&track=false")["tracked"] is False
    # An outsider reads `off` (the default variant): nothing to expose.
    body = render(client, "user_id=outsider-exp-4&flag_keys=checkout-button")
    assert body["variants"] == {"checkout_button": "off"} and body["tracked"] is True
    render(client, "user_id=u-exp-5&flag_keys=checkout-button")  # the one exposure
    tracker.flush()
    assert [e["user_id"] for e in received(sandboxes)] == ["u-exp-5"]


def test_flags_evaluated_remotely_are_exposed_once_too(make_app, sandboxes):
    """premium-upsell without the property goes to /v1/vardata with no-track: Amplitude records
    nothing, so the proxy's exposure is the only one."""
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    context = "context=%7B%22user_properties%22%3A%7B%22premium%22%3Atrue%7D%7D"
    for _ in range(3):
        body = render(client, f"user_id=u-exp-6&flag_keys=premium-upsell&{context}")
        assert body["variants"] == {"premium_upsell": "on"}
    tracker.flush()
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 0
    assert [e["event_properties"]["[Experiment] Variant"] for e in received(sandboxes)] == ["on"]


def test_short_ids_are_exposed_too(make_app, sandboxes):
    """Amplitude refuses ids under 5 characters unless told otherwise; Experiment evaluated
    them, so their exposures are sent with `min_id_length` 1."""
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    render(client, "user_id=u-1&flag_keys=checkout-button")
    render(client, "device_id=d7&flag_keys=checkout-button")
    tracker.flush()
    assert sorted(e.get("user_id") or e["device_id"] for e in received(sandboxes)) == ["d7", "u-1"]
    assert tracker.counts["sent"] == 2 and tracker.counts["failed"] == 0


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: nothing listens there


def test_exposures_ignore_proxy_settings_in_the_environment(make_app, sandboxes, monkeypatch):
    """The SDK's own transport (urllib) would send through HTTP_PROXY, here a dead one; the
    README promises that only CCPROXY_UPSTREAM_PROXY is ever used."""
    dead = f"http://127.0.0.1:{_dead_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    # urllib reads the environment when it builds its global opener: one built earlier in
    # this process must not hide what a fresh worker would do.
    monkeypatch.setattr(urllib.request, "_opener", None)
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    for _ in range(3):
        render(client, "user_id=treatment-exp-7&flag_keys=checkout-button")
    tracker.flush()
    assert [e["user_id"] for e in received(sandboxes)] == ["treatment-exp-7"]
    assert tracker.counts["sent"] == 1 and tracker.counts["failed"] == 0


def test_without_an_analytics_key_nothing_is_tracked(make_app, sandboxes):
    app = local_app(make_app, amplitude_api_key="")
    client = app.test_client()
    assert app.extensions["ccproxy"].exposures is None
    for _ in range(3):
        body = render(client, "user_id=treatment-exp-8&flag_keys=checkout-button,hero-banner")
        assert body["tracked"] is False and body["variants"]["checkout_button"] == "treatment"
    app.extensions["ccproxy"].close()  # a worker's exit: would flush anything queued
    assert received(sandboxes) == []
    assert sandboxes.state("amplitude").paths["/2/httpapi"] == 0


def test_remote_mode_sends_no_exposure_event(make_app, sandboxes):
    """Remote evaluation with tracking: Amplitude records the assignment itself."""
    client = make_app().test_client()
    assert render(client, "user_id=treatment-exp-9&flag_keys=checkout-button")["tracked"] is True
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 1
    assert make_app().extensions["ccproxy"].exposures is None


def test_one_exposure_across_processes_sharing_redis(make_app, sandboxes, redis_server):
    """Two workers (or boxes) with Redis: the renders of one message reach both, one event."""
    redis_server["client"].flushdb()
    apps = [local_app(make_app, redis_url=redis_server["url"]) for _ in range(2)]
    for i in range(3):
        render(apps[i % 2].test_client(), "user_id=treatment-exp-10&flag_keys=checkout-button")
    for app in apps:
        app.extensions["ccproxy"].exposures.flush()
    assert [e["user_id"] for e in received(sandboxes)] == ["treatment-exp-10"]
    assert sum(a.extensions["ccproxy"].exposures.counts["shared_duplicate"] for a in apps) == 1


def test_a_failing_events_api_is_retried_by_the_sdk(make_app, sandboxes):
    url = sandboxes.servers["amplitude"].url
    requests.post(f"{url}/__sandbox/faults", json={"mode": "error", "count": 1}, timeout=5).raise_for_status()
    app = local_app(make_app)
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    render(client, "user_id=treatment-exp-11&flag_keys=checkout-button")
    tracker.flush()  # the first attempt meets the 500 and goes back to the SDK's buffer
    from servers import wait_for

    def arrived() -> bool:
        tracker.flush()
        return len(received(sandboxes)) == 1

    wait_for(arrived, seconds=60, poll=0.2, what="the retried exposure")
    assert sandboxes.state("amplitude").paths["/2/httpapi"] == 2


def test_exposures_amplitude_refuses_for_its_key_are_counted_failed(make_app, sandboxes):
    app = local_app(make_app, amplitude_api_key="not-the-sandbox-key")
    client, tracker = app.test_client(), app.extensions["ccproxy"].exposures
    render(client, "user_id=treatment-key-1&flag_keys=checkout-button,hero-banner")
    tracker.flush()
    assert tracker.counts["failed"] == 2 and tracker.counts["sent"] == 0
