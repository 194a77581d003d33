"""The sandbox answers like the documented User Profile API (it stands in for it in demo and tests)."""

import requests
from conftest import load_json

from proxy.sandbox import amplitude
from proxy.sandbox.base import SandboxState
from proxy.sandbox.server import RunningServer

KEY = {"Authorization": f"Api-Key {amplitude.DEFAULT_KEY}"}


def get(sandboxes, headers=KEY, path="/v1/userprofile", **params):
    return requests.get(sandboxes.servers["amplitude"].url + path, params=params, headers=headers, timeout=5)


def test_seed_examples_to_the_byte(sandboxes):
    cases = {
        "recommendation": {"get_recs": "true", "rec_id": "testRecId"},
        "two_recommendations": {"get_recs": "true", "rec_id": "testRecId,testRecId2"},
        "properties": {"get_amp_props": "true"},
        "cohorts": {"get_cohort_ids": "true"},
        "one_computation": {"comp_id": "testCompId"},
        "computations": {"get_computations": "true"},
    }
    for name, params in cases.items():
        answer = get(sandboxes, user_id="testUser", **params)
        assert answer.status_code == 200
        assert answer.json() == load_json(f"amplitude/{name}.json"), name


def test_documented_errors(sandboxes):
    missing = get(sandboxes, headers={}, user_id="testUser")
    assert missing.status_code == 401 and missing.text == "Missing Api-Key in Authorization header"
    wrong = get(sandboxes, headers={"Authorization": "Api-Key nope"}, user_id="testUser")
    assert wrong.status_code == 401 and wrong.text == "Invalid Api-Key"
    assert get(sandboxes, user_id="unknown-42").json() == {"error": "User id and device id not seen before"}
    inactive = get(sandboxes, user_id="inactive-1", get_recs="true", rec_id="r").json()
    assert inactive["userData"]["recommendations"] is None
    wrong_path = get(sandboxes, path="/v1/userprofiles", user_id="testUser")
    assert wrong_path.status_code == 404 and wrong_path.content == b""


def test_other_users_are_deterministic_and_different(sandboxes):
    a1 = get(sandboxes, user_id="alice", get_recs="true", rec_id="r1").json()
    a2 = get(sandboxes, user_id="alice", get_recs="true", rec_id="r1").json()
    b = get(sandboxes, user_id="bob", get_recs="true", rec_id="r1").json()
    assert a1 == a2
    assert a1["userData"]["recommendations"][0]["items"] != b["userData"]["recommendations"][0]["items"]
    assert len(a1["userData"]["recommendations"][0]["items"]) == 5


def test_rate_limit_answers_429_with_retry_after():
    server = RunningServer(amplitude.make_app(state=SandboxState(rate_per_minute=3))).start()
    try:
        statuses = [
            requests.get(server.url + "/v1/userprofile", params={"user_id": "u"}, headers=KEY, timeout=5)
            for _ in range(4)
        ]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert int(statuses[-1].headers["Retry-After"]) >= 1
    finally:
        server.stop()
