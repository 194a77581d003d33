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


def test_the_open_paths_are_the_views_marked_open(make_app):
    """Derived from the routes (auth.open_to_all): probes, the pixel and consent pages only."""
    app = make_app(api_keys=KEYS, start_delivery=False)
    assert app.wsgi_app.open_paths == {"/healthz", "/readyz", "/v1/mediarithmics/pixel.gif",
                                       "/v1/mediarithmics/consent"}
    client = app.test_client()
    assert client.get("/v1/mediarithmics/pixel.gif?email_hash=a&event=open").status_code == 200
    assert client.get("/v1/mediarithmics/consent?email_hash=a").status_code == 403  # the page, unsigned
    assert client.post("/v1/mediarithmics/consent?email_hash=a").status_code == 403
    for closed in ("/v1/templates", "/v1/mediarithmics/consent-link?email_hash=a&processing_id=1",
                   "/v1/mediarithmics/pixel-link?email_hash=a&event=open", "/metrics"):
        assert client.get(closed).status_code == 401, closed
