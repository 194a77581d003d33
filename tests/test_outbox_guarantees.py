"""What the outbox promises at its edges, in process against the sandbox over loopback: a
duplicate is a duplicate even when the outbox is full, an operator's retry never reverts
consent, and a key shared through Redis never names a write that was not stored."""

from __future__ import annotations

import time
import uuid

from test_writes import activity

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
