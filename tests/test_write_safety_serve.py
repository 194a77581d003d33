"""Writes you can trust, with real processes: `ccproxy serve` with two gevent workers sharing
one outbox, against the sandbox over loopback. Concurrent idempotent POSTs, a delivery slower
than the lease, and a full disk (a small tmpfs in a mount namespace)."""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import test_write_safety

sandbox_writes = test_write_safety.sandbox_writes  # the fixture, shared
KEY = "write-safety-key"
ACTIVITIES = "/v1/mediarithmics/activities"


def store_of(sandboxes):
    return sandboxes.servers["mediarithmics"].app.config["STORE"]


def activity(marker: str, pad: str = "") -> dict:
    return {"$type": "TOUCH", "$ts": 1735689600000, "marker": marker, "pad": pad,
            "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "serve"}]}


def session() -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {KEY}"
    return s


@pytest.fixture
def serve(sandboxes, servers, tmp_path):
    """Start `ccproxy serve` (two workers by default); `servers` stops each one at the end."""
    env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
    env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
                "CCPROXY_OUTBOX_MAX_BACKOFF": "0.5", "CCPROXY_LOG_LEVEL": "WARNING"})

    def start(workers: int = 2, prefix: tuple[str, ...] = (), **settings: str):
        return servers.start(["serve", "--workers", str(workers)],
                             {**env, **{"CCPROXY_" + k.upper(): v for k, v in settings.items()}},
                             clean_env=True, command=[*prefix, sys.executable, "-m", "proxy.cli"])

    return start


def wait_delivered(base: str, write_id: str, seconds: float = 60.0) -> dict:
    s = session()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = s.get(f"{base}/v1/mediarithmics/writes/{write_id}", timeout=5).json()
        if body["state"] == "delivered":
            return body
        time.sleep(0.1)
    raise AssertionError(f"{write_id} not delivered: {body}")


def test_concurrent_posts_with_one_key_across_two_workers_make_one_write(serve, sandboxes):
    server = serve()
    base = server.base
    # Started without CCPROXY_LINK_SECRET: start-up says pixels are not recorded.
    assert "CCPROXY_LINK_SECRET is not set" in server.output()
    markers = [uuid.uuid4().hex for _ in range(10)]

    def post(marker: str) -> requests.Response:
        return session().post(base + ACTIVITIES, json=activity(marker), timeout=10,
                              headers={"Idempotency-Key": f"dispatch-1-{marker}"})

    with ThreadPoolExecutor(30) as pool:  # three at once for each of ten keys
        answers = list(pool.map(post, [m for m in markers for _ in range(3)]))
    assert [r.status_code for r in answers] == [202] * 30
    for n in range(len(markers)):
        bodies = [r.json() for r in answers[3 * n: 3 * n + 3]]
        assert len({b["id"] for b in bodies}) == 1
        assert sorted(b["duplicate"] for b in bodies) == [False, True, True]
        wait_delivered(base, bodies[0]["id"])
    time.sleep(0.5)
    seen = [a.get("marker") for a in store_of(sandboxes).activities]
    assert [seen.count(m) for m in markers] == [1] * 10


def test_a_write_slower_than_the_lease_is_delivered_once(serve, sandboxes, sandbox_writes):
    sandbox_writes.slow_seconds, sandbox_writes.slow_count = 18.0, 1
    base = serve().base
    marker = uuid.uuid4().hex
    write_id = session().post(base + ACTIVITIES, json=activity(marker), timeout=10).json()["id"]
    done = wait_delivered(base, write_id, 60)
    assert done["attempts"] == 1
    time.sleep(1.0)
    assert [a.get("marker") for a in store_of(sandboxes).activities].count(marker) == 1
    # Both workers polled the outbox for the whole 18 s, and neither started it again.
    assert sum(1 for w in store_of(sandboxes).writes if w[3].get("marker") == marker) == 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a tmpfs mount")
def test_a_full_outbox_answers_503_and_readyz_says_why(serve, sandboxes, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    outbox = disk / "outbox.sqlite3"
    # A private mount namespace: a 400 KB tmpfs only the proxy sees, removed with it.
    script = f'mount -t tmpfs -o size=400k tmpfs {disk} && exec "$@"'
    sandboxes.state("mediarithmics").set_fault("error")  # nothing drains; rows pile up
    base = serve(1, ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
                 outbox_path=str(outbox), link_secret="s" * 32, outbox_max_backoff="60").base
    s = session()
    statuses = []
    for n in range(40):
        r = s.post(base + ACTIVITIES, json=activity(f"full-{n}", pad="x" * 40_000), timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "outbox_unavailable"
            assert int(r.headers["Retry-After"]) > 0
            break
    assert 202 in statuses and statuses[-1] == 503, statuses
    assert 500 not in statuses
    ready = requests.get(base + "/readyz", timeout=5).json()
    assert ready["degraded"] is True and "outbox_unwritable" in [r["code"] for r in ready["reasons"]]
    assert ready["outbox"]["usable"] is False
    link = s.get(base + "/v1/mediarithmics/pixel-link?email_hash=full&event=open", timeout=5).json()["url"]
    gif = requests.get(link, timeout=5)
    assert gif.status_code == 200 and gif.headers["Content-Type"] == "image/gif"
    consent = s.put(base + "/v1/mediarithmics/choices?user_point_id=full-1&processing_id=101",
                    json={"$choice_acceptance_value": False, "pad": "x" * 40_000}, timeout=10)
    assert consent.status_code == 503 and "Retry-After" in consent.headers
