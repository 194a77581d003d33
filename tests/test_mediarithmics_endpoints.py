"""mediarithmics read endpoints end to end against the sandbox."""

import pytest
from conftest import upstream_calls


def test_profile_flat(client):
    body = client.get("/v1/mediarithmics/profile?user_point_id=up-1").get_json()
    assert body["found"] is True
    profile = body["profile"]
    assert {"loyalty_tier", "address_city", "address_zip_code", "user_account_id"} <= set(profile)
    assert profile["creation_ts_iso"].endswith("Z")


def test_unknown_user_point_is_found_false(client):
    r = client.get("/v1/mediarithmics/profile?email_hash=unknown-hash")
    assert r.status_code == 200 and r.get_json()["found"] is False


def test_choices_and_one_processing(client):
    body = client.get("/v1/mediarithmics/choices?compartment_id=1&user_account_id=optout-7").get_json()
    assert body["choices"]["processing_101"] is False
    assert set(body["choices"]) == {"processing_101", "processing_102"}
    one = client.get("/v1/mediarithmics/choices?user_agent_id=vec:1&processing_id=102").get_json()
    assert list(one["choices"]) == ["processing_102"] and one["choice_count"] == 1


def test_history_newest_first(client):
    body = client.get("/v1/mediarithmics/choices/history?user_point_id=up-2&processing_id=101").get_json()
    stamps = [entry["choice_ts"] for entry in body["history"]]
    assert stamps == sorted(stamps, reverse=True) and len(stamps) == 3


@pytest.mark.parametrize(
    "query",
    ["", "compartment_id=1", "user_point_id=a&email_hash=b", "user_point_id=a&compartment_id=1&user_account_id=b"],
)
def test_selector_must_be_exactly_one(client, sandboxes, query):
    r = client.get(f"/v1/mediarithmics/profile?{query}")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_selector"
    assert upstream_calls(sandboxes, "mediarithmics") == 0


def test_history_needs_numeric_processing_id(client):
    assert client.get("/v1/mediarithmics/choices/history?user_point_id=a").status_code == 400
    assert client.get("/v1/mediarithmics/choices/history?user_point_id=a&processing_id=x").status_code == 400


def test_selector_values_are_encoded(client, sandboxes):
    client.get("/v1/mediarithmics/profile?user_point_id=a%2C/b%3Dc")
    raw = sandboxes.state("mediarithmics").last_uri
    assert "/user_points/user_point_id=a%2C%2Fb%3Dc/user_profiles" in raw


def test_wrong_token_is_502_and_not_echoed(make_app):
    r = make_app(mediarithmics_token="leaky-token").test_client().get("/v1/mediarithmics/profile?user_point_id=a")
    assert r.status_code == 502 and b"leaky-token" not in r.data


@pytest.mark.parametrize("value", ["/", "a/b", "%2F", "../.."])
def test_an_id_with_slashes_stays_one_segment_upstream(client, value):
    """The sandbox routes on the raw path as the API does: an encoded slash never splits the
    selector, so the answer is the user point's (found or not), not a redirect turned into a 502."""
    from urllib.parse import quote

    r = client.get(f"/v1/mediarithmics/profile?user_agent_id={quote(value, safe='')}")
    assert r.status_code == 200, r.get_json()
    assert isinstance(r.get_json()["found"], bool)
