"""The outbox loses nothing: a killed proxy, restarted, delivers every accepted write exactly
once; a clean restart in the middle of deliveries delivers none twice. Real processes
(`ccproxy serve` on gunicorn) against the sandbox over loopback."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
import requests
from servers import wait_for

KEY = "outbox-test-key"


def store_of(sandboxes):
    return sandboxes.servers["mediarithmics"].app.config["STORE"]


@pytest.fixture
def proxy_process(sandboxes, servers, tmp_path):
    env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
    env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
                "CCPROXY_OUTBOX_MAX_BACKOFF": "0.5", "CCPROXY_LOG_LEVEL": "WARNING"})

    def start():
        return servers.start(["serve", "--workers", "1"], env, clean_env=True)

    return start


def post_activities(base, count):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    markers, ids = [], []
    for _ in range(count):
        marker = uuid.uuid4().hex
        r = session.post(f"{base}/v1/mediarithmics/activities", timeout=5, json={
            "$type": "TOUCH", "$ts": 1735689600000, "marker": marker,
            "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "durable"}]})
        assert r.status_code == 202
        markers.append(marker)
        ids.append(r.json()["id"])
    return markers, ids


def wait_all_delivered(base, ids, seconds=120.0):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    deadline = time.monotonic() + seconds
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for write_id in list(pending):
            if session.get(f"{base}/v1/mediarithmics/writes/{write_id}", timeout=5).json()["state"] == "delivered":
                pending.discard(write_id)
        time.sleep(0.1)
    assert not pending, f"{len(pending)} writes not delivered"


def arrivals(sandboxes, markers):
    seen = Counter(a.get("marker") for a in store_of(sandboxes).activities)
    return [seen[m] for m in markers]


def test_kill_while_upstream_fails_then_restart_delivers_everything_once(sandboxes, proxy_process):
    sandboxes.state("mediarithmics").set_fault("error")  # every delivery fails for now
    first = proxy_process()
    markers, ids = post_activities(first.base, 8)
    wait_for(lambda: sandboxes.state("mediarithmics").calls >= 1, what="a failed delivery attempt")
    assert arrivals(sandboxes, markers) == [0] * 8
    first.kill()  # no goodbye: master and worker die at once
    sandboxes.state("mediarithmics").set_fault("none")
    wait_all_delivered(proxy_process().base, ids)
    assert arrivals(sandboxes, markers) == [1] * 8


def test_clean_restart_during_deliveries_never_delivers_twice(sandboxes, proxy_process):
    # Slow deliveries and more writes than can be delivered before the stop, on any machine.
    sandboxes.state("mediarithmics").latency = 1.0
    try:
        first = proxy_process()
        markers, ids = post_activities(first.base, 30)
        wait_for(lambda: sandboxes.state("mediarithmics").calls >= 1, what="a delivery in flight")
        assert first.terminate() == 0
        delivered_before = sum(arrivals(sandboxes, markers))
        assert delivered_before < 30  # the stop really came mid-way
        wait_all_delivered(proxy_process().base, ids)
    finally:
        sandboxes.state("mediarithmics").latency = 0
    assert arrivals(sandboxes, markers) == [1] * 30
