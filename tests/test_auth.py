import base64

import pytest

from proxy.auth import key_is_valid, parse_keys, presented_key

KEYS = "k-one-111,k-two-222"
URL = "/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId"


@pytest.fixture
def locked(make_app):
    return make_app(api_keys=KEYS).test_client()


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer k-one-111"},
        {"X-Api-Key": "k-two-222"},
        {"Authorization": "Basic " + base64.b64encode(b"braze:k-two-222").decode()},
        {"Authorization": "Basic " + base64.b64encode(b":k-one-111").decode()},
    ],
)
def test_accepted_forms(locked, headers):
    assert locked.get(URL, headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"X-Api-Key": "k-one-11"},
     {"Authorization": "Basic !!!"}, {"Authorization": "Basic " + base64.b64encode(b"k-one-111").decode()}],
)
def test_refused_with_error_shape(locked, headers):
    r = locked.get(URL, headers=headers)
    assert r.status_code == 401 and r.get_json() == {
        "ok": False, "error": {"code": "unauthorized", "message": r.get_json()["error"]["message"]}}
    assert b"k-one-111" not in r.data


def test_health_stays_open(locked):
    assert locked.get("/healthz").status_code == 200


def test_no_keys_means_open(client):
    assert client.get(URL).status_code == 200


def test_helpers():
    assert parse_keys(" a, ,b ") == ["a", "b"]
    assert presented_key({"Authorization": "bearer x"}) == "x"
    assert key_is_valid("b", ["a", "b"]) and not key_is_valid("", ["a"]) and not key_is_valid("c", ["a"])
