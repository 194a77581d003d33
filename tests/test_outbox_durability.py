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
        r = session.post(f"{base}/v1/mediarithmics/activities", timeout=30, json={
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
            if session.get(f"{base}/v1/mediarithmics/writes/{write_id}", timeout=30).json()["state"] == "delivered":
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
    # Its last calls may still wait in the upstream's socket: answered after the fault is
    # lifted, they would be applied (a write cut off by a crash is sent again: at least once).
    answered_and_quiet(sandboxes.state("mediarithmics"))
    sandboxes.state("mediarithmics").set_fault("none")
    wait_all_delivered(proxy_process().base, ids)
    assert arrivals(sandboxes, markers) == [1] * 8


def answered_and_quiet(state, seconds: float = 1.0) -> None:
    """Every call the upstream received is answered, and none came for `seconds`."""
    seen: list[tuple[int, int]] = []

    def settled() -> bool:
        seen.append((state.calls, sum(state.statuses.values())))
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1][0] == seen[-1][1]

    wait_for(settled, seconds=60, poll=seconds, what="the killed worker's calls answered")


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


def test_an_outcome_the_file_refuses_is_recorded_later_and_never_sent_again(tmp_path, monkeypatch):
    """"delivered" could not be written (disk full) while the lease ran out: the same process
    must keep the write as its own and record it later, not send it a second time."""
    import sqlite3

    from proxy import delivery, outbox

    monkeypatch.setattr(outbox, "LEASE_SECONDS", 0.3)  # lapses while the outcome waits
    monkeypatch.setattr(delivery, "LEASE_SECONDS", 0.3)
    monkeypatch.setattr(delivery, "RECORD_RETRY_FIRST", 0.5, raising=False)
    box = outbox.Outbox(str(tmp_path / "outbox.sqlite3"))
    write_id = box.add("activity", "POST", "/v1/datamarts/1/user_activities", {}, {"$type": "TOUCH"}).id
    real, refusals = box._finish_now, Counter()

    def finish(*args):
        if refusals["full"] < 2:
            refusals["full"] += 1
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args)

    monkeypatch.setattr(box, "_finish_now", finish)
    sent: list[str] = []
    deliverer = delivery.Deliverer(box, lambda write: sent.append(write.id), poll=0.05).start()
    try:
        wait_for(lambda: box.get(write_id).state == "delivered", seconds=30, poll=0.05, what="recorded")
    finally:
        deliverer.stop(5)
    assert sent == [write_id] and refusals["full"] == 2


def test_a_write_of_a_holder_known_gone_is_taken_over_whatever_its_lease_says(tmp_path):
    """A worker killed mid-delivery, then the wall clock stepped back an hour: its lease looks
    an hour long, but its process is known to be gone, so another takes the write now. A live
    holder's write, or one this host cannot check, still waits for its lease."""
    import socket
    import sqlite3
    import subprocess
    import sys

    from proxy import outbox

    box = outbox.Outbox(str(tmp_path / "outbox.sqlite3"))
    ids = [box.add("choice", "PUT", f"/v1/x/user_points/user_point_id=u{i}/user_choices/processing_id=101",
                   {}, {"$choice_acceptance_value": False}).id for i in range(3)]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    host, namespace = socket.gethostname(), outbox._pid_namespace()
    gone = "/".join((host, namespace, ended.stdout.strip(), "1", "deadbeef"))
    live = outbox.Outbox(box.path).owner  # this very process, through another outbox object
    elsewhere = "/".join(("another-host", namespace, "1", "1", "cafef00d"))
    with sqlite3.connect(box.path, isolation_level=None) as db:
        for write_id, owner in zip(ids, (gone, live, elsewhere), strict=True):
            db.execute("UPDATE writes SET lease_owner=?, lease_until=? WHERE id=?",
                       (owner, time.time() + 3600, write_id))
    assert [w.id for w in box.claim(10)] == [ids[0]]
