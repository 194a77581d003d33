"""What the outbox promises at its edges, in process against the sandbox over loopback: a
duplicate is a duplicate even when the outbox is full, an operator's retry never reverts
consent, and a key shared through Redis never names a write that was not stored."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from servers import wait_for
from test_write_safety import wait_until
from test_writes import activity, store_of, wait_for_state

ACTIVITIES = "/v1/mediarithmics/activities"


def test_a_duplicate_of_an_accepted_write_is_a_duplicate_even_when_the_outbox_is_full(
        make_app, sandboxes, tmp_path):
    sandboxes.state("mediarithmics").set_fault("error")  # nothing drains
    client = make_app(outbox_path=str(tmp_path / "capped.sqlite3"), outbox_max_rows=2,
                      outbox_max_backoff=30).test_client()
    key = {"Idempotency-Key": f"full-{uuid.uuid4().hex}"}
    first = client.post(ACTIVITIES, json=activity("kept"), headers=key)
    assert first.status_code == 202
    assert client.post(ACTIVITIES, json=activity("fills")).status_code == 202
    time.sleep(1.1)  # the per-process count is refreshed once a second
    new = client.post(ACTIVITIES, json=activity("refused"))
    assert new.status_code == 503 and new.get_json()["error"]["code"] == "outbox_full"
    again = client.post(ACTIVITIES, json=activity("kept"), headers=key)
    assert again.status_code == 202, again.get_data(as_text=True)
    assert again.get_json()["duplicate"] is True and again.get_json()["id"] == first.get_json()["id"]
    # A reused key with another body is still told so, full or not.
    reused = client.post(ACTIVITIES, json=activity("other"), headers=key)
    assert reused.status_code == 422 and reused.get_json()["error"]["code"] == "idempotency_key_reused"


def test_retry_never_sends_a_dead_subscribe_after_a_later_unsubscribe(make_app, sandboxes, tmp_path):
    path = str(tmp_path / "consent.sqlite3")
    client = make_app(outbox_path=path, outbox_max_backoff=0.2, outbox_retention=0.5).test_client()
    user = f"consent-{uuid.uuid4().hex[:8]}"
    choice = f"/v1/mediarithmics/choices?user_point_id={user}&processing_id=101"
    sandboxes.state("mediarithmics").set_fault("refuse", count=1)  # the subscribe is refused: dead
    subscribe = client.put(choice, json={"$choice_acceptance_value": True}).get_json()["id"]
    assert wait_for_state(client, subscribe, ("dead",))["state"] == "dead"
    unsubscribe = client.put(choice, json={"$choice_acceptance_value": False}).get_json()["id"]
    wait_for_state(client, unsubscribe)
    # Retention passes (an activity delivered beside it is purged): the unsubscribe's row is
    # kept, since it is what says the dead subscribe is superseded.
    other = client.post(ACTIVITIES, json=activity("purged")).get_json()["id"]
    wait_for_state(client, other)
    wait_until(lambda: client.get(f"/v1/mediarithmics/writes/{other}").status_code == 404, 30,
               "retention purge")
    assert client.get(f"/v1/mediarithmics/writes/{unsubscribe}").status_code == 200

    env = {"CCPROXY_OUTBOX_PATH": path, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "retry"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "requeued 0 dead letter" in done.stdout
    assert f"skipped {subscribe} (choice): superseded by the later write {unsubscribe} (delivered)" in done.stdout
    assert client.get(f"/v1/mediarithmics/writes/{subscribe}").get_json()["state"] == "dead"
    puts = [w for w in store_of(sandboxes).writes if w[0] == "PUT" and user in w[1]]
    assert [w[3]["$choice_acceptance_value"] for w in puts] == [False]
    # Asked for by id, it is refused the same way (exit status 1: nothing requeued).
    by_id = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "retry", subscribe],
                           capture_output=True, text=True, env=env, timeout=60)
    assert by_id.returncode == 1 and f"skipped {subscribe}" in by_id.stdout


# -- idempotency keys shared through Redis -------------------------------------------------

def new_idem_key(redis_client, before: set[bytes]) -> bytes:
    def found():
        return set(redis_client.keys(b"ccproxy:idem:*")) - before
    return next(iter(wait_for(found, seconds=30, poll=0.01, what="the key claimed in Redis")))


def test_a_duplicate_is_never_told_duplicate_of_a_write_not_yet_stored(make_app, redis_server, tmp_path):
    boxes = [make_app(redis_url=redis_server["url"]).test_client() for _ in range(2)]
    path = boxes[0].application.extensions["ccproxy"].outbox.path
    key = {"Idempotency-Key": f"pending-{uuid.uuid4().hex}"}
    before = set(redis_server["client"].keys(b"ccproxy:idem:*"))
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the first box cannot commit (busy)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(boxes[0].post, ACTIVITIES, json=activity("pending"), headers=key)
            new_idem_key(redis_server["client"], before)  # claimed, not stored
            second = boxes[1].post(ACTIVITIES, json=activity("pending"), headers=key)
            assert first.result().status_code == 503
    finally:
        lock.rollback()
        lock.close()
    if second.status_code == 409:  # the first was still being stored
        assert second.get_json()["error"]["code"] == "idempotency_key_in_progress"
        assert int(second.headers["Retry-After"]) >= 1
    else:  # the first had failed already: the second stored its own
        assert second.status_code == 202 and second.get_json()["duplicate"] is False, second.get_json()
        assert boxes[1].get(f"/v1/mediarithmics/writes/{second.get_json()['id']}").status_code == 200
    # Whatever the timing, every answer now names a stored write.
    again = wait_for(lambda: stored_answer(boxes[1], key, "pending"), seconds=30, what="a stored write")
    assert again.status_code == 202


def test_a_failed_forget_leaves_no_key_naming_a_write_never_stored(make_app, redis_server):
    client = make_app(redis_url=redis_server["url"]).test_client()
    services = client.application.extensions["ccproxy"]
    key = {"Idempotency-Key": f"forget-{uuid.uuid4().hex}"}
    before = set(redis_server["client"].keys(b"ccproxy:idem:*"))
    lock = sqlite3.connect(services.outbox.path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    admin = redis_server["client"]
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, ACTIVITIES, json=activity("forget"), headers=key)
            new_idem_key(admin, before)
            # Redis now refuses to drop the key: the proxy cannot tell it the write failed.
            admin.execute_command("ACL", "SETUSER", "default", "-del", "-@scripting")
            try:
                assert first.result().status_code == 503
            finally:
                admin.execute_command("ACL", "SETUSER", "default", "+@all")
    finally:
        lock.rollback()
        lock.close()
    wait_for(services.redis.usable, seconds=30, what="Redis used again")
    answer = wait_for(lambda: stored_answer(client, key, "forget"), seconds=30, what="a stored write")
    assert answer.get_json()["duplicate"] is False  # never "duplicate" of the unstored one


def stored_answer(client, key, marker):
    """The key's answer once it is a 202 (None while 409); a 202 must name a stored write."""
    r = client.post(ACTIVITIES, json=activity(marker), headers=key)
    if r.status_code == 409:
        assert r.get_json()["error"]["code"] == "idempotency_key_in_progress"
        return None
    assert r.status_code == 202, r.get_data(as_text=True)
    assert client.get(f"/v1/mediarithmics/writes/{r.get_json()['id']}").status_code == 200, \
        f"{r.get_json()} names a write that was never stored"
    return r


def test_a_consent_write_outlives_max_attempts_of_temporary_failures(make_app, sandboxes):
    """A recipient was told "unsubscribed": a 5xx outage longer than the attempts allow never
    turns the choice into a dead letter (an activity beside it does), and it is delivered
    once mediarithmics answers again."""
    mediarithmics = sandboxes.state("mediarithmics")
    mediarithmics.set_fault("error")
    client = make_app(outbox_max_attempts=2, outbox_max_backoff=0.05, breaker_threshold=1000).test_client()
    user = f"outage-{uuid.uuid4().hex[:8]}"
    choice = client.put(f"/v1/mediarithmics/choices?user_point_id={user}&processing_id=101",
                        json={"$choice_acceptance_value": False}).get_json()["id"]
    other = client.post(ACTIVITIES, json=activity("outage")).get_json()["id"]
    assert wait_for_state(client, other, ("dead",))["attempts"] == 2
    wait_until(lambda: client.get(f"/v1/mediarithmics/writes/{choice}").get_json()["attempts"] >= 4, 60,
               "the choice retried past the attempts")
    assert client.get(f"/v1/mediarithmics/writes/{choice}").get_json()["state"] == "failed"
    mediarithmics.set_fault("none")
    assert wait_for_state(client, choice)["state"] == "delivered"
    assert store_of(sandboxes).choices[f"user_point_id={user}"]["101"]["$choice_acceptance_value"] is False


def test_an_open_circuit_is_not_an_attempt(make_app, sandboxes, clock):
    """Attempts count calls made: while the circuit is open nothing is sent, so a write is
    postponed, not brought closer to a dead letter."""
    mediarithmics = sandboxes.state("mediarithmics")
    mediarithmics.set_fault("error")
    client = make_app(outbox_max_attempts=3, outbox_max_backoff=0.05, breaker_threshold=1,
                      breaker_reset=1.0).test_client()
    write = client.post(ACTIVITIES, json=activity("circuit")).get_json()["id"]

    def attempts() -> int:
        return client.get(f"/v1/mediarithmics/writes/{write}").get_json()["attempts"]

    # Between probes the circuit is open (the breaker runs on the test's clock): claims come
    # every few hundred milliseconds, and only the probes may count.
    for probe in (1, 2):
        wait_until(lambda probe=probe: attempts() >= probe, 60, f"probe {probe}")
        time.sleep(1.5)  # claims while open: none of them an attempt
        assert attempts() == probe == mediarithmics.calls
        clock.advance(2)  # past the breaker's reset: the next claim is a probe
    dead = wait_for_state(client, write, ("dead",))
    assert dead["attempts"] == mediarithmics.calls == 3  # one attempt per call, one call per probe


def test_a_write_answered_2xx_with_a_body_that_is_not_json_is_delivered_once(make_app, sandboxes):
    """Some gateways answer a write `200 OK` in plain text: it was applied, so it is delivered,
    not sent again until it dies."""
    sandboxes.state("mediarithmics").set_fault("applied_not_json", count=1)
    client = make_app(outbox_max_backoff=0.05).test_client()
    marker = uuid.uuid4().hex
    write = client.post(ACTIVITIES, json=activity(marker)).get_json()["id"]
    done = wait_for_state(client, write, ("delivered", "dead"))
    assert (done["state"], done["attempts"]) == ("delivered", 1)
    assert [a.get("marker") for a in store_of(sandboxes).activities].count(marker) == 1


def test_a_write_accepted_for_another_datamart_is_never_sent_with_this_proxys_token(make_app, sandboxes):
    """An outbox file shared by accident (a demo's, another deployment's): its writes name
    their datamart in the path, and this proxy does not deliver another account's data."""
    client = make_app(outbox_max_backoff=0.05).test_client()
    outbox = client.application.extensions["ccproxy"].outbox
    marker = uuid.uuid4().hex
    stray = outbox.add("activity", "POST", "/v1/datamarts/999999/user_activities", {}, activity(marker)).id
    dead = wait_for_state(client, stray, ("dead", "delivered"))
    assert dead["state"] == "dead" and "/v1/datamarts/999999" in dead["last_error"]
    assert "not sent" in dead["last_error"]
    assert [a.get("marker") for a in store_of(sandboxes).activities].count(marker) == 0
    assert sandboxes.state("mediarithmics").calls == 0


def test_a_choice_that_cannot_succeed_dies_and_does_not_hold_back_the_next(make_app, sandboxes):
    """Consent outlives temporary failures only: a subscribe refused for the credentials (403)
    dies after its attempts, and the unsubscribe queued behind it (same user point and
    processing, delivered in order) goes out."""
    mediarithmics = sandboxes.state("mediarithmics")
    mediarithmics.set_fault("forbidden", count=3)
    client = make_app(outbox_max_attempts=3, outbox_max_backoff=0.05).test_client()
    user = f"revoked-{uuid.uuid4().hex[:8]}"
    choice = f"/v1/mediarithmics/choices?user_point_id={user}&processing_id=101"
    subscribe = client.put(choice, json={"$choice_acceptance_value": True}).get_json()["id"]
    unsubscribe = client.put(choice, json={"$choice_acceptance_value": False}).get_json()["id"]
    assert wait_for_state(client, subscribe, ("dead",))["attempts"] == 3
    assert wait_for_state(client, unsubscribe)["state"] == "delivered"
    assert store_of(sandboxes).choices[f"user_point_id={user}"]["101"]["$choice_acceptance_value"] is False
