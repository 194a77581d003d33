"""mediarithmics write side over loopback: outbox delivery, dead letters, pixel, links."""

from __future__ import annotations

import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from proxy.writes.pixel import PIXEL

LINK_SECRET = "test-link-secret-0123456789"


def store_of(sandboxes):
    return sandboxes.servers["mediarithmics"].app.config["STORE"]


def wait_for_state(client, write_id, states=("delivered",), seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = client.get(f"/v1/mediarithmics/writes/{write_id}").get_json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"write {write_id} still {body['state']}: {body}")


def activity(marker, **extra):
    return {"$type": "TOUCH", "$ts": 1735689600000, "$user_identifiers": [
        {"$type": "USER_EMAIL", "$hash": "h-" + marker}], "marker": marker, **extra}


@pytest.fixture
def writer(make_app):
    return make_app(outbox_max_backoff=0.2, link_secret=LINK_SECRET).test_client()


def test_activity_is_queued_then_delivered(writer, sandboxes):
    marker = uuid.uuid4().hex
    r = writer.post("/v1/mediarithmics/activities", json=activity(marker))
    assert r.status_code == 202
    body = r.get_json()
    assert body["ok"] and body["state"] == "queued" and body["status_url"].endswith(body["id"])
    done = wait_for_state(writer, body["id"])
    assert done["attempts"] == 1 and done["delivered_at"].endswith("Z")
    # The session sandbox also holds other tests' activities (the fuzzer sends the OpenAPI example).
    assert [a.get("marker") for a in store_of(sandboxes).activities].count(marker) == 1


@pytest.mark.parametrize(
    "payload, problem",
    [
        ([1, 2], "JSON object"),
        ({"$type": "TOUCH", "$ts": 1}, "$user_identifiers"),
        ({"$type": "TOUCH", "$ts": 1, "$user_identifiers": []}, "non-empty list"),
        ({"$ts": 1, "$user_agent_id": "vec:1"}, "$type"),
        ({"$type": "TOUCH", "$user_account_id": "a", "$compartment_id": "1"}, "$ts"),
        ({"$type": "TOUCH", "$ts": "yesterday", "$email_hash": "h"}, "$ts"),
    ],
)
def test_invalid_activities_are_400_naming_the_problem(writer, payload, problem):
    r = writer.post("/v1/mediarithmics/activities", json=payload)
    assert r.status_code == 400 and problem in r.get_json()["error"]["message"]


def test_legacy_identifiers_are_accepted(writer):
    r = writer.post("/v1/mediarithmics/activities",
                    json={"$type": "TOUCH", "$ts": 5, "$user_account_id": "a", "$compartment_id": "1"})
    assert r.status_code == 202


def test_rejected_write_is_a_dead_letter_and_can_be_retried(writer, sandboxes):
    r = writer.post("/v1/mediarithmics/activities", json=activity("dead", **{"$type": "BOGUS"}))
    dead = wait_for_state(writer, r.get_json()["id"], ("dead",))
    assert "unknown $type 'BOGUS'" in dead["last_error"] and dead["attempts"] == 1
    outbox = writer.application.extensions["ccproxy"].outbox
    assert [w.id for w in outbox.list_writes("dead")] == [dead["id"]]
    assert outbox.retry(dead["id"]) == 1
    assert wait_for_state(writer, dead["id"], ("dead",))["attempts"] == 1  # rejected again


def test_transient_failures_are_retried_until_delivered(writer, sandboxes):
    sandboxes.state("mediarithmics").set_fault("error", count=2)
    r = writer.post("/v1/mediarithmics/activities", json=activity("retry"))
    done = wait_for_state(writer, r.get_json()["id"])
    assert done["attempts"] == 3


def test_profile_update_goes_to_the_documented_path(writer, sandboxes):
    r = writer.put("/v1/mediarithmics/profile?email_hash=h9&compartment_id=1&user_account_id=acc-9"
                   "&force_replace=false&merge_objects=true", json={"loyalty": {"tier": "gold"}})
    assert r.status_code == 202
    wait_for_state(writer, r.get_json()["id"])
    method, path, query, body = store_of(sandboxes).writes[-1]
    assert method == "PUT" and path == (
        "/v1/datamarts/1509/user_points/email_hash=h9/user_profiles/compartment_id=1/user_account_id=acc-9")
    assert query == {"force_replace": "false", "merge_objects": "true"} and body == {"loyalty": {"tier": "gold"}}


def test_profile_update_needs_compartment_and_account(writer):
    r = writer.put("/v1/mediarithmics/profile?email_hash=h9", json={"a": 1})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "missing_parameter"


def test_choice_update_changes_what_reads_return(writer, sandboxes):
    r = writer.put("/v1/mediarithmics/choices?user_point_id=choice-1&processing_id=101",
                   json={"$choice_acceptance_value": False})
    wait_for_state(writer, r.get_json()["id"])
    body = writer.get("/v1/mediarithmics/choices?user_point_id=choice-1&processing_id=101").get_json()
    assert body["choices"] == {"processing_101": False}
    assert writer.put("/v1/mediarithmics/choices?user_point_id=c&processing_id=101", json={}).status_code == 400


def test_unknown_write_is_404(writer):
    assert writer.get("/v1/mediarithmics/writes/nope").status_code == 404


def pixel_recorded(sandboxes, marker, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [a for a in store_of(sandboxes).activities
                 if a.get("$events", [{}])[0].get("$properties", {}).get("campaign") == marker]
        if found:
            return found
        time.sleep(0.05)
    return []


def test_pixel_records_an_open(make_app, sandboxes):
    client = make_app(outbox_max_backoff=0.2, allow_unsigned_pixel=True).test_client()
    marker = uuid.uuid4().hex
    r = client.get(f"/v1/mediarithmics/pixel.gif?email_hash=h1&event=email_open&campaign={marker}")
    assert r.status_code == 200 and r.mimetype == "image/gif" and r.data == PIXEL
    assert "no-store" in r.headers["Cache-Control"]
    (recorded,) = pixel_recorded(sandboxes, marker)
    assert recorded["$user_identifiers"] == [{"$type": "USER_EMAIL", "$hash": "h1"}]
    assert recorded["$events"][0]["$event_name"] == "email_open"


@pytest.mark.parametrize("query", ["", "email_hash=h1", "event=open", "email_hash=h&user_point_id=p&event=o",
                                   "email_hash=" + "x" * 300 + "&event=o"])
def test_pixel_with_bad_input_still_answers_a_gif_and_records_nothing(make_app, query):
    client = make_app().test_client()
    outbox = client.application.extensions["ccproxy"].outbox
    before = sum(outbox.counts().values())
    r = client.get(f"/v1/mediarithmics/pixel.gif?{query}")
    assert r.status_code == 200 and r.data == PIXEL
    assert sum(outbox.counts().values()) == before


def test_pixel_when_the_outbox_is_broken_still_answers(make_app, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    client = make_app(outbox_path=str(blocker / "outbox.sqlite3")).test_client()
    r = client.get("/v1/mediarithmics/pixel.gif?email_hash=h&event=open")
    assert r.status_code == 200 and r.data == PIXEL


def test_signed_pixel_is_required_when_links_are_signed(writer, sandboxes):
    marker = uuid.uuid4().hex
    unsigned = writer.get(f"/v1/mediarithmics/pixel.gif?email_hash=h2&event=open&campaign={marker}")
    assert unsigned.data == PIXEL
    link = writer.get(f"/v1/mediarithmics/pixel-link?email_hash=h2&event=open&campaign={marker}").get_json()["url"]
    parts = urlsplit(link)
    assert writer.get(f"{parts.path}?{parts.query}").data == PIXEL
    assert len(pixel_recorded(sandboxes, marker)) == 1  # the signed one only


def consent_link(client, selector="user_point_id=link-1", accept="false", **extra):
    query = f"{selector}&processing_id=101&accept={accept}" + "".join(f"&{k}={v}" for k, v in extra.items())
    r = client.get(f"/v1/mediarithmics/consent-link?{query}")
    assert r.status_code == 200, r.get_json()
    parts = urlsplit(r.get_json()["url"])
    return f"{parts.path}?{parts.query}"


def current_choice(client, selector):
    services = client.application.extensions["ccproxy"]
    return services.mediarithmics.choices(selector, "101").send().data[0]["$choice_acceptance_value"]


def test_consent_link_confirms_and_records_once_clicked(writer, sandboxes):
    link = consent_link(writer, "user_point_id=link-ok")
    assert current_choice(writer, {"user_point_id": "link-ok"}) is True
    page = writer.get(link)
    assert page.status_code == 200 and b"<form method=\"post\">" in page.data
    assert current_choice(writer, {"user_point_id": "link-ok"}) is True  # opening changes nothing
    done = writer.post(link, data={"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200 and b"unsubscribed" in done.data
    deadline = time.monotonic() + 60
    while current_choice(writer, {"user_point_id": "link-ok"}) is not False and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current_choice(writer, {"user_point_id": "link-ok"}) is False
    # A subscribe link binds the choice's version: once the choice changed, it is refused.
    subscribe = consent_link(writer, "user_point_id=link-ok", accept="true")
    writer.put("/v1/mediarithmics/choices?user_point_id=link-ok&processing_id=101",
               json={"$choice_acceptance_value": False, "note": "changed again"})
    deadline = time.monotonic() + 5
    while len([w for w in store_of(sandboxes).writes if "link-ok" in w[1]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    replay = writer.post(subscribe)
    assert replay.status_code == 403 and b"changed" in replay.data
    # An unsubscribe link binds nothing: used again, it is honoured again.
    again = writer.post(link)
    assert again.status_code == 200 and b"unsubscribed" in again.data


@pytest.mark.parametrize("tamper", ["accept=false->accept=true", "link-bad->link-other", "sig=->sig=A"])
def test_tampered_links_record_nothing(writer, sandboxes, tamper):
    link = consent_link(writer, "user_point_id=link-bad")
    old, new = tamper.split("->")
    tampered = link.replace(old, new, 1)
    assert tampered != link
    before = len(store_of(sandboxes).writes)
    assert writer.get(tampered).status_code == 403
    r = writer.post(tampered)
    assert r.status_code == 403 and b"Nothing was changed" in r.data
    time.sleep(0.3)
    assert len(store_of(sandboxes).writes) == before


def test_expired_links_are_refused(writer):
    link = consent_link(writer, "user_point_id=link-exp", expires=str(int(time.time()) + 1))
    time.sleep(2.1)
    r = writer.post(link)
    assert r.status_code == 403 and b"expired" in r.data


def test_links_need_a_secret(make_app):
    client = make_app().test_client()
    r = client.get("/v1/mediarithmics/consent-link?user_point_id=x&processing_id=101")
    assert r.status_code == 503 and "CCPROXY_LINK_SECRET" in r.get_json()["error"]["message"]


def test_consent_footer_carries_a_working_link(writer):
    text = writer.get("/v1/render/consent_footer?user_point_id=footer-1&format=text").get_data(as_text=True)
    assert "Unsubscribe in one click: http" in text
    url = text.split("Unsubscribe in one click: ", 1)[1].split()[0]
    query = parse_qs(urlsplit(url).query)
    assert query["accept"] == ["false"] and query["processing_id"] == ["101"] and "sig" in query
    parts = urlsplit(url)
    assert writer.get(f"{parts.path}?{parts.query}").status_code == 200


def test_cli_outbox_lists_and_retries_dead_letters(writer, tmp_path):
    import subprocess
    import sys

    r = writer.post("/v1/mediarithmics/activities", json=activity("cli-dead", **{"$type": "NOPE"}))
    dead = wait_for_state(writer, r.get_json()["id"], ("dead",))
    path = writer.application.extensions["ccproxy"].settings.outbox_path
    env = {"CCPROXY_OUTBOX_PATH": path, "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert listed.returncode == 0 and dead["id"] in listed.stdout and "dead 1" in listed.stdout
    assert "unknown $type 'NOPE'" in listed.stdout
    retried = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "retry", dead["id"]],
                             capture_output=True, text=True, env=env, timeout=30)
    assert retried.returncode == 0 and "requeued 1" in retried.stdout
    unknown = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "retry", "no-such-id"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert unknown.returncode == 1 and "no dead letter with id no-such-id" in unknown.stderr
    bogus = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox", "--state", "bogus"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert bogus.returncode == 2 and "invalid choice: 'bogus'" in bogus.stderr


def test_cli_outbox_says_there_is_none_instead_of_making_an_empty_one(tmp_path):
    import subprocess
    import sys

    env = {"CCPROXY_OUTBOX_PATH": "ccproxy-outbox.sqlite3", "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "proxy.cli", "outbox"], capture_output=True, text=True,
                            env=env, timeout=30, cwd=tmp_path)
    assert listed.returncode == 1 and "no outbox at " + str(tmp_path / "ccproxy-outbox.sqlite3") in listed.stderr
    assert not (tmp_path / "ccproxy-outbox.sqlite3").exists()


def test_a_subscribe_link_clicked_twice_says_done_twice_and_records_once(writer, sandboxes):
    """The second click finds the first click's write queued (then delivered): that is the
    link's own doing, not a change since the email was sent."""
    subscribe = consent_link(writer, "user_point_id=double-click", accept="true")
    first, second = writer.post(subscribe), writer.post(subscribe)
    assert (first.status_code, second.status_code) == (200, 200)
    assert b"You are subscribed" in first.data and b"You are subscribed" in second.data
    outbox = writer.application.extensions["ccproxy"].outbox
    [write] = [w for w in outbox.list_writes(None) if "double-click" in w.path]
    wait_for_state(writer, write.id)
    assert writer.post(subscribe).status_code == 200  # delivered: still the same link's choice
    assert len([w for w in store_of(sandboxes).writes if "double-click" in w[1]]) == 1


def test_a_subscribe_confirmed_while_the_outbox_is_locked_is_try_again_not_a_500(make_app, tmp_path):
    import sqlite3

    path = str(tmp_path / "locked.sqlite3")
    client = make_app(link_secret=LINK_SECRET, outbox_path=path).test_client()
    subscribe = consent_link(client, "user_point_id=locked", accept="true")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # in WAL mode, the only lock readers wait for
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, 0)")
    try:
        r = client.post(subscribe)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 503 and r.mimetype == "text/html" and r.headers["Retry-After"]
    assert b"Nothing was changed" in r.data


def test_a_replayed_key_answers_what_became_of_the_earlier_write(writer, sandboxes):
    key = {"Idempotency-Key": f"replay-{uuid.uuid4().hex}"}
    sandboxes.state("mediarithmics").set_fault("refuse", count=1)
    first = writer.post("/v1/mediarithmics/activities", json=activity("replayed"), headers=key)
    assert first.get_json()["state"] == "queued"
    wait_for_state(writer, first.get_json()["id"], ("dead",))
    again = writer.post("/v1/mediarithmics/activities", json=activity("replayed"), headers=key)
    assert again.status_code == 202
    assert (again.get_json()["duplicate"], again.get_json()["state"]) == (True, "dead")


def test_an_old_subscribe_link_clicked_again_after_an_unsubscribe_is_refused(writer, sandboxes):
    """The link's own earlier write is no excuse once a later choice followed it."""
    subscribe = consent_link(writer, "user_point_id=changed-mind", accept="true")
    assert writer.post(subscribe).status_code == 200
    unsubscribe = writer.put("/v1/mediarithmics/choices?user_point_id=changed-mind&processing_id=101",
                             json={"$choice_acceptance_value": False}).get_json()["id"]
    wait_for_state(writer, unsubscribe)
    again = writer.post(subscribe)
    assert again.status_code == 403 and b"changed" in again.data
