"""Writes you can trust during a send (issue 12), in process against the sandbox over loopback:
idempotency keys, lanes, order per user point, retention, the row cap, pixel dedup and
unsigned pixels, consent links that never depend on a state the proxy could not read."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_writes import LINK_SECRET, activity, store_of, wait_for_state

from proxy import links
from proxy.outbox import Outbox
from proxy.writes.pixel import PIXEL

ACTIVITIES = "/v1/mediarithmics/activities"


def wait_until(predicate, seconds=10.0, what="condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {seconds} s")


def arrivals_of(sandboxes, marker):
    return [a for a in store_of(sandboxes).activities if a.get("marker") == marker]


def metric(client, name, **labels):
    """The value of one sample of /metrics (0 when absent)."""
    text = client.get("/metrics").get_data(as_text=True)
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def writer(make_app):
    return make_app(outbox_max_backoff=0.2, link_secret=LINK_SECRET).test_client()


@pytest.fixture
def shm_dir():
    """A scratch directory in memory, for tests that fill an outbox with thousands of rows
    (the outbox syncs every accepted write to disk; the test is about order, not disks)."""
    path = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox_writes(sandboxes):
    """The sandbox's write faults, cleared after the test."""
    store = store_of(sandboxes)
    yield store
    with store.lock:
        store.write_latency, store.slow_seconds, store.slow_count = 0.0, 0.0, 0


# -- idempotency ---------------------------------------------------------------------------

def test_same_key_three_times_is_one_write_with_the_same_id(writer, sandboxes):
    marker = uuid.uuid4().hex
    answers = [writer.post(ACTIVITIES, json=activity(marker), headers={"Idempotency-Key": f"k-{marker}"})
               for _ in range(3)]
    assert [r.status_code for r in answers] == [202, 202, 202]
    bodies = [r.get_json() for r in answers]
    assert len({b["id"] for b in bodies}) == 1
    assert [b["duplicate"] for b in bodies] == [False, True, True]
    wait_for_state(writer, bodies[0]["id"])
    time.sleep(0.3)  # a second delivery, if there were one, would have landed by now
    assert len(arrivals_of(sandboxes, marker)) == 1
    assert writer.application.extensions["ccproxy"].outbox.counts().get("delivered") == 1


def test_key_as_query_parameter_and_a_different_body_is_422(writer):
    key = uuid.uuid4().hex
    first = writer.post(f"{ACTIVITIES}?idempotency_key={key}", json=activity("a"))
    again = writer.post(f"{ACTIVITIES}?idempotency_key={key}", json=activity("a"))
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"] and again.get_json()["duplicate"] is True
    other = writer.post(f"{ACTIVITIES}?idempotency_key={key}", json=activity("b"))
    assert other.status_code == 422
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert sum(writer.application.extensions["ccproxy"].outbox.counts().values()) == 1


def test_keys_are_scoped_to_the_credential_and_the_endpoint(make_app):
    client = make_app(api_keys="key-one,key-two").test_client()
    key = {"Idempotency-Key": "same-key"}
    one = client.post(ACTIVITIES, json=activity("s"), headers={**key, "X-Api-Key": "key-one"})
    two = client.post(ACTIVITIES, json=activity("s"), headers={**key, "X-Api-Key": "key-two"})
    assert one.status_code == two.status_code == 202
    assert one.get_json()["id"] != two.get_json()["id"] and two.get_json()["duplicate"] is False
    choice = client.put("/v1/mediarithmics/choices?user_point_id=scope-1&processing_id=101",
                        json={"$choice_acceptance_value": True}, headers={**key, "X-Api-Key": "key-one"})
    assert choice.status_code == 202 and choice.get_json()["duplicate"] is False
    assert sum(client.application.extensions["ccproxy"].outbox.counts().values()) == 3


def test_a_key_expires_after_its_ttl(make_app):
    client = make_app(idempotency_ttl=0.5).test_client()
    first = client.post(ACTIVITIES, json=activity("ttl"), headers={"Idempotency-Key": "ttl-key"})
    time.sleep(0.7)
    later = client.post(ACTIVITIES, json=activity("ttl-2"), headers={"Idempotency-Key": "ttl-key"})
    assert later.status_code == 202 and later.get_json()["duplicate"] is False
    assert later.get_json()["id"] != first.get_json()["id"]


def test_a_malformed_key_is_400(writer):
    r = writer.post(ACTIVITIES, json=activity("m"), headers={"Idempotency-Key": "x" * 300})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_parameter"


def test_keys_hold_across_boxes_with_redis(make_app, redis_server, sandboxes):
    marker = uuid.uuid4().hex
    boxes = [make_app(redis_url=redis_server["url"]).test_client() for _ in range(2)]  # two outbox files
    answers = [box.post(ACTIVITIES, json=activity(marker), headers={"Idempotency-Key": marker})
               for box in (*boxes, boxes[1])]
    assert len({r.get_json()["id"] for r in answers}) == 1
    assert [r.get_json()["duplicate"] for r in answers] == [False, True, True]
    wait_for_state(boxes[0], answers[0].get_json()["id"])
    time.sleep(0.3)
    assert len(arrivals_of(sandboxes, marker)) == 1
    other = boxes[1].post(ACTIVITIES, json=activity("other"), headers={"Idempotency-Key": marker})
    assert other.status_code == 422


# -- lanes, order, concurrency -------------------------------------------------------------

def test_consent_behind_5000_queued_opens_is_delivered_first(make_app, sandboxes, shm_dir):
    path = str(shm_dir / "outbox.sqlite3")
    early = Outbox(path)
    activities_path = "/v1/datamarts/1509/user_activities"
    for number in range(5000):
        early.add("activity", "POST", activities_path, {}, activity(f"open-{number}"))
    early.add("choice", "PUT", "/v1/datamarts/1509/user_points/user_point_id=lane-1/user_choices/processing_id=101",
              {}, {"$choice_acceptance_value": False})
    store = store_of(sandboxes)
    writes_before = len(store.writes)
    make_app(outbox_path=path, outbox_concurrency=8)  # starts delivering at once
    wait_until(lambda: any("lane-1" in w[1] for w in store.writes[writes_before:]), 20, "consent delivered")
    order = [w[1] for w in store.writes[writes_before:]]
    position = next(i for i, p in enumerate(order) if "lane-1" in p)
    # Claimed first; at most the other deliveries of its first batch may land before it.
    assert position < 8, order[: position + 1]
    assert Outbox(path).lane_stats()["activity"].depth > 4000  # the opens were still waiting


def test_one_user_points_choices_arrive_in_the_order_accepted(writer, sandboxes, sandbox_writes):
    sandbox_writes.slow_seconds, sandbox_writes.slow_count = 1.0, 1  # the unsubscribe is slow
    url = "/v1/mediarithmics/choices?user_point_id=order-1&processing_id=101"
    first = writer.put(url, json={"$choice_acceptance_value": False})
    second = writer.put(url, json={"$choice_acceptance_value": True})
    for answer in (first, second):
        wait_for_state(writer, answer.get_json()["id"])
    values = [w[3]["$choice_acceptance_value"] for w in sandbox_writes.writes if "order-1" in w[1]]
    assert values == [False, True]
    read = writer.get("/v1/mediarithmics/choices?user_point_id=order-1&processing_id=101&cb=1")
    assert read.get_json()["choices"] == {"processing_101": True}


def test_deliveries_run_concurrently(make_app, sandboxes, sandbox_writes):
    sandbox_writes.write_latency = 0.3
    client = make_app(outbox_concurrency=8).test_client()
    ids = [client.post(ACTIVITIES, json=activity(f"c-{n}")).get_json()["id"] for n in range(8)]
    services = client.application.extensions["ccproxy"]
    # All eight are in flight at once (one at a time, only one would be).
    wait_until(lambda: services.deliverer.in_flight >= 6, 5, "deliveries in flight together")
    for write_id in ids:
        wait_for_state(client, write_id)


# -- bounds --------------------------------------------------------------------------------

def test_delivered_rows_are_purged_after_the_retention(make_app):
    client = make_app(outbox_retention=0.5, idempotency_ttl=60).test_client()
    plain = client.post(ACTIVITIES, json=activity("purge")).get_json()["id"]
    keyed = client.post(ACTIVITIES, json=activity("keep"), headers={"Idempotency-Key": "keep"}).get_json()["id"]
    wait_for_state(client, plain)
    wait_for_state(client, keyed)
    wait_until(lambda: client.get(f"/v1/mediarithmics/writes/{plain}").status_code == 404, 10, "purge")
    # A row whose idempotency key still lives is kept, so the key keeps answering.
    assert client.get(f"/v1/mediarithmics/writes/{keyed}").status_code == 200
    again = client.post(ACTIVITIES, json=activity("keep"), headers={"Idempotency-Key": "keep"})
    assert again.get_json()["id"] == keyed and again.get_json()["duplicate"] is True


def test_the_cap_refuses_opens_and_activities_never_consent(make_app, sandboxes, tmp_path):
    path = str(tmp_path / "capped.sqlite3")
    sandboxes.state("mediarithmics").set_fault("error")  # nothing drains
    client = make_app(outbox_path=path, outbox_max_rows=3, outbox_max_backoff=30,
                      link_secret=LINK_SECRET).test_client()
    for n in range(3):
        assert client.post(ACTIVITIES, json=activity(f"cap-{n}")).status_code == 202
    time.sleep(1.1)  # the per-process count is refreshed once a second
    refused = client.post(ACTIVITIES, json=activity("cap-over"))
    assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "outbox_full"
    assert int(refused.headers["Retry-After"]) > 0
    link = client.get("/v1/mediarithmics/pixel-link?email_hash=cap&event=open").get_json()["url"]
    parts = urlsplit(link)
    gif = client.get(f"{parts.path}?{parts.query}")
    assert gif.status_code == 200 and gif.data == PIXEL
    consent = client.put("/v1/mediarithmics/choices?user_point_id=cap-1&processing_id=101",
                         json={"$choice_acceptance_value": False})
    assert consent.status_code == 202
    assert sum(client.application.extensions["ccproxy"].outbox.counts().values()) == 4
    assert metric(client, "ccproxy_outbox_dropped_total", reason="outbox_full") == 2
    assert metric(client, "ccproxy_outbox_depth", lane="activity") == 3
    assert metric(client, "ccproxy_outbox_depth", lane="choice") == 1
    assert metric(client, "ccproxy_outbox_oldest_seconds", lane="activity") > 0


def test_cli_purges_dead_letters(writer):
    import subprocess
    import sys

    r = writer.post(ACTIVITIES, json=activity("cli-purge", **{"$type": "NOPE"}))
    dead = wait_for_state(writer, r.get_json()["id"], ("dead",))
    path = writer.application.extensions["ccproxy"].settings.outbox_path
    env = {"CCPROXY_OUTBOX_PATH": path, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "purge"], capture_output=True,
                          text=True, env=env, timeout=30)
    assert done.returncode == 0 and "purged 1 dead letter" in done.stdout
    assert writer.get(f"/v1/mediarithmics/writes/{dead['id']}").status_code == 404


# -- pixels --------------------------------------------------------------------------------

def test_a_replayed_pixel_link_is_recorded_once(writer, sandboxes):
    marker = uuid.uuid4().hex
    link = writer.get(f"/v1/mediarithmics/pixel-link?email_hash=px&event=open&campaign={marker}").get_json()["url"]
    parts = urlsplit(link)
    for _ in range(20):
        assert writer.get(f"{parts.path}?{parts.query}").data == PIXEL
    outbox = writer.application.extensions["ccproxy"].outbox
    assert sum(outbox.counts().values()) == 1
    wait_until(lambda: any(a.get("$events", [{}])[0].get("$properties", {}).get("campaign") == marker
                           for a in store_of(sandboxes).activities), 5, "open recorded")
    assert metric(writer, "ccproxy_outbox_dropped_total", reason="pixel_duplicate") == 19


def test_unsigned_pixels_are_not_recorded_without_a_secret(make_app):
    client = make_app().test_client()
    r = client.get("/v1/mediarithmics/pixel.gif?email_hash=forged&event=open")
    assert r.status_code == 200 and r.data == PIXEL
    assert sum(client.application.extensions["ccproxy"].outbox.counts().values()) == 0
    assert metric(client, "ccproxy_outbox_dropped_total", reason="pixel_unsigned") == 1


def test_check_warns_about_the_missing_link_secret(sandboxes):
    from test_check import run_check

    done = run_check(sandboxes)
    assert "WARN CCPROXY_LINK_SECRET is not set" in done.stdout
    signed = run_check(sandboxes, CCPROXY_LINK_SECRET="s" * 32)
    assert "CCPROXY_LINK_SECRET" not in signed.stdout and signed.returncode == 0


# -- consent links that always work --------------------------------------------------------

def test_unsubscribe_links_made_while_choices_fail_work_after_recovery(writer, sandboxes):
    user = f"fail-{uuid.uuid4().hex[:8]}"
    sandboxes.state("mediarithmics").set_fault("error")
    unsubscribe = writer.get(f"/v1/mediarithmics/consent-link?user_point_id={user}&processing_id=101&accept=false")
    assert unsubscribe.status_code == 200
    subscribe = writer.get(f"/v1/mediarithmics/consent-link?user_point_id={user}&processing_id=101&accept=true")
    assert subscribe.status_code == 503 and int(subscribe.headers["Retry-After"]) > 0
    assert subscribe.get_json()["error"]["code"] == "consent_state_unknown"
    footer = writer.get(f"/v1/render/consent_footer?user_point_id={user}&format=text").get_data(as_text=True)
    assert "not subscribed" not in footer and "because you subscribed" not in footer
    assert "Manage your email preferences" in footer and "Unsubscribe in one click: http" in footer
    footer_link = footer.split("Unsubscribe in one click: ", 1)[1].split()[0]
    sandboxes.state("mediarithmics").set_fault("none")
    for url in (unsubscribe.get_json()["url"], footer_link):
        parts = urlsplit(url)
        done = writer.post(f"{parts.path}?{parts.query}")
        assert done.status_code == 200 and b"unsubscribed" in done.data
    # One write per distinct link: the footer's link may be the very same link (then one write).
    distinct = len({urlsplit(u).query for u in (unsubscribe.get_json()["url"], footer_link)})
    wait_until(lambda: sum(1 for w in store_of(sandboxes).writes if user in w[1]) == distinct, 60,
               "both recorded")
    assert [w[3]["$choice_acceptance_value"] for w in store_of(sandboxes).writes if user in w[1]] == [False] * distinct


def test_an_old_unsubscribe_link_bound_to_a_version_is_honoured(writer, sandboxes):
    params = {"user_point_id": "old-link", "processing_id": "101", "accept": "false", "v": "12345"}
    query = links.signed_query(LINK_SECRET, "/v1/mediarithmics/consent", params, int(time.time()) + 3600)
    done = writer.post(f"/v1/mediarithmics/consent?{query}")
    assert done.status_code == 200 and b"unsubscribed" in done.data


def test_subscribe_links_are_not_signed_from_a_fallback(make_app, tmp_path, sandboxes):
    fallbacks = tmp_path / "fallbacks.toml"
    fallbacks.write_text('["/v1/mediarithmics/choices"]\nchoices = { "101" = false }\n')
    client = make_app(link_secret=LINK_SECRET, fallbacks_file=str(fallbacks)).test_client()
    sandboxes.state("mediarithmics").set_fault("error")
    r = client.get("/v1/mediarithmics/consent-link?user_point_id=fb-1&processing_id=101&accept=true")
    assert r.status_code == 503 and "Retry-After" in r.headers
    html = client.get("/v1/render/consent_footer?user_point_id=fb-1").get_data(as_text=True)
    assert "not subscribed" not in html and "Unsubscribe in one click" in html


def test_an_outbox_from_the_previous_release_is_upgraded_in_place(tmp_path):
    import sqlite3

    from proxy.outbox import SCHEMA

    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA + "CREATE INDEX writes_due ON writes (state, next_attempt_at);")
    for number, kind in enumerate(("activity", "choice", "choice")):
        db.execute("INSERT INTO writes (id, kind, method, path, query, body, state, next_attempt_at, created_at)"
                   " VALUES (?, ?, 'PUT', ?, '{}', '{}', 'queued', 0, ?)",
                   (f"old-{number}", kind, "/a" if kind == "activity" else "/choice-1", number))
    db.close()
    outbox = Outbox(path)
    claimed = outbox.claim(10)
    # The first choice comes first (consent lane); the second waits for it (same user point).
    assert [w.id for w in claimed] == ["old-1", "old-0"]
    outbox.delivered(claimed[0])
    assert [w.id for w in outbox.claim(10)] == ["old-2"]
