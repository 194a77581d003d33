"""The outbox loses nothing: a killed proxy, restarted, delivers every accepted write exactly
once; a clean restart in the middle of deliveries delivers none twice. Real processes
(`ccproxy serve` on gunicorn) against the sandbox over loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
import requests
from test_cli import free_port, wait_until_up

KEY = "outbox-test-key"


def store_of(sandboxes):
    return sandboxes.servers["mediarithmics"].app.config["STORE"]


@pytest.fixture
def proxy_process(sandboxes, tmp_path):
    procs, logs = [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update({"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()})
    env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
                "CCPROXY_OUTBOX_MAX_BACKOFF": "0.5", "CCPROXY_LOG_LEVEL": "WARNING"})

    def start(**settings: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = (tmp_path / f"serve-{len(procs)}.log").open("w")
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--workers", "1"],
                                env={**env, **{"CCPROXY_" + k.upper(): v for k, v in settings.items()}}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, proc)
        return proc, base

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for log in logs:
        log.close()


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


def wait_all_delivered(base, ids, seconds=30.0):
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
    proc, base = proxy_process()
    markers, ids = post_activities(base, 8)
    time.sleep(1.0)  # deliveries are attempted, and fail
    assert arrivals(sandboxes, markers) == [0] * 8
    os.killpg(proc.pid, signal.SIGKILL)  # no goodbye: master and worker die at once
    proc.wait(10)
    sandboxes.state("mediarithmics").set_fault("none")
    _proc, base = proxy_process()
    wait_all_delivered(base, ids)
    assert arrivals(sandboxes, markers) == [1] * 8


def test_clean_restart_during_deliveries_never_delivers_twice(sandboxes, proxy_process):
    sandboxes.state("mediarithmics").latency = 0.25  # deliveries are in flight when we stop
    try:
        # Two deliveries at a time, so that the stop comes with some delivered, some in flight
        # and some waiting.
        proc, base = proxy_process(outbox_concurrency="2")
        markers, ids = post_activities(base, 10)
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        delivered_before = sum(arrivals(sandboxes, markers))
        assert delivered_before < 10  # the stop really came mid-way
        _proc, base = proxy_process()
        wait_all_delivered(base, ids)
    finally:
        sandboxes.state("mediarithmics").latency = 0
    assert arrivals(sandboxes, markers) == [1] * 10
