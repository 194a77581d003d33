"""End to end: the proxy app calls the sandbox Amplitude server over loopback HTTP."""

import re

import pytest
from conftest import all_keys, upstream_calls

from proxy.shape.common import IDENTIFIER

RECS = "/v1/amplitude/recommendations"


def test_recommendations_flat_answer(client):
    r = client.get(f"{RECS}?user_id=testUser&rec_id=testRecId,testRecId2")
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    assert body["ok"] is True and body["found"] is True
    assert body["item_1"] == "cookie" and body["items_joined"].startswith("cookie, cracker")
    assert body["recommendations"]["testRecId2"]["item_3"] == "kimchi"
    assert body["last_updated"] == "2020-12-22T20:58:40Z"
    assert r.headers["X-Cache"] == "MISS" and r.headers["Cache-Control"] == "max-age=300"


def test_second_call_is_a_hit_and_ttl_counts_down(client, sandboxes, clock):
    client.get(f"{RECS}?user_id=testUser&rec_id=testRecId")
    clock.advance(100)
    r = client.get(f"{RECS}?user_id=testUser&rec_id=testRecId&cb=123")  # cache buster ignored
    assert r.headers["X-Cache"] == "HIT"
    assert r.headers["Cache-Control"] == "max-age=200" and r.headers["Age"] == "100"
    assert upstream_calls(sandboxes) == 1
    clock.advance(200)
    # Past its TTL but within grace: served at once, refreshed in the background.
    stale = client.get(f"{RECS}?user_id=testUser&rec_id=testRecId")
    assert stale.headers["X-Cache"] == "STALE" and stale.get_json()["stale"] is True
    client.application.extensions["ccproxy"].cache.drain()
    assert upstream_calls(sandboxes) == 2
    fresh = client.get(f"{RECS}?user_id=testUser&rec_id=testRecId")
    assert fresh.headers["X-Cache"] == "HIT" and fresh.get_json()["stale"] is False


def test_rec_id_order_shares_the_upstream_call(client, sandboxes):
    a = client.get(f"{RECS}?user_id=alice&rec_id=a,b").get_json()
    b = client.get(f"{RECS}?user_id=alice&rec_id=b,a").get_json()
    assert upstream_calls(sandboxes) == 1
    assert a["rec_id"] == "a" and b["rec_id"] == "b"
    assert a["recommendations"] == b["recommendations"]


def test_per_kind_ttl_setting(make_app, clock):
    client = make_app(cache_ttl_cohorts=10, cache_grace=0, cache_max_stale=0).test_client()
    client.get("/v1/amplitude/cohorts?user_id=alice")
    clock.advance(9)
    assert client.get("/v1/amplitude/cohorts?user_id=alice").headers["X-Cache"] == "HIT"
    clock.advance(2)
    assert client.get("/v1/amplitude/cohorts?user_id=alice").headers["X-Cache"] == "MISS"


def test_every_endpoint_keys_are_identifiers_and_no_null_fields(client):
    for path in (
        f"{RECS}?user_id=testUser&rec_id=summer-sale,testRecId",
        "/v1/amplitude/properties?user_id=carol",
        "/v1/amplitude/computations?user_id=testUser",
        "/v1/amplitude/cohorts?device_id=ffff-ffff-ffff-ffff",
        "/v1/amplitude/profile?user_id=testUser&rec_id=testRecId",
    ):
        body = client.get(path).get_json()
        assert body["ok"] is True, path
        assert all(IDENTIFIER.match(k) for k in all_keys(body)), path
        assert None not in body.values(), path


def test_computations_and_single_comp_id(client):
    body = client.get("/v1/amplitude/computations?user_id=testUser").get_json()
    assert body["computations"] == {"computed_prop_1": 5000000.0, "computed_prop_2": 3}
    one = client.get("/v1/amplitude/computations?user_id=testUser&comp_id=testCompId").get_json()
    assert one["value"] == 3


def test_cohort_membership(client):
    body = client.get("/v1/amplitude/cohorts?user_id=testUser&cohort_id=cohort3").get_json()
    assert body["member"] is True and body["cohort_count"] == 3 and body["cohorts"]["cohort7"] is True


def test_profile_is_one_upstream_call(client, sandboxes):
    body = client.get("/v1/amplitude/profile?user_id=testUser&rec_id=testRecId").get_json()
    assert upstream_calls(sandboxes) == 1
    assert body["item_1"] == "cookie"
    assert body["properties"]["library"] == "http/1.0"
    assert body["properties"]["computed_prop_1"] == 5000000.0
    assert body["computations"] == {"computed_prop_1": 5000000.0, "computed_prop_2": 3}
    assert body["cohort_ids"] == ["cohort1", "cohort3", "cohort7"]


def test_unknown_and_inactive_users_are_200_found_false(client):
    unknown = client.get(f"{RECS}?user_id=unknown-1&rec_id=testRecId")
    assert unknown.status_code == 200
    body = unknown.get_json()
    assert body["found"] is False and body["item_count"] == 0 and body["items"] == []
    assert body["user_id"] == "unknown-1"
    inactive = client.get(f"{RECS}?user_id=inactive-9&rec_id=testRecId").get_json()
    assert inactive["found"] is False and inactive["device_id"] != ""


def test_unicode_values_pass_through(client):
    found = {
        client.get(f"/v1/amplitude/properties?user_id=user{i}").get_json()["properties"]["city"]
        for i in range(30)
    }
    assert found & {"São Paulo", "Zürich", "Tōkyō", "Montréal"}


@pytest.mark.parametrize(
    "query, code",
    [
        ("rec_id=a", "missing_parameter"),
        ("user_id=u", "missing_parameter"),
        ("user_id=u&rec_id=", "missing_parameter"),
        ("user_id=" + "x" * 257 + "&rec_id=a", "invalid_parameter"),
        ("user_id=a%0Ab&rec_id=a", "invalid_parameter"),
        ("user_id=u&rec_id=a&rec_type=foo", "invalid_parameter"),
    ],
)
def test_bad_input_is_400_with_error_shape(client, sandboxes, query, code):
    r = client.get(f"{RECS}?{query}")
    assert r.status_code == 400
    body = r.get_json()
    assert body["ok"] is False and body["error"]["code"] == code and body["error"]["message"]
    assert upstream_calls(sandboxes) == 0


def test_unknown_path_and_method_are_json(client):
    r = client.get("/v1/amplitude/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.post(f"{RECS}?user_id=u&rec_id=a")
    assert r.status_code == 405 and r.get_json()["ok"] is False


def test_wrong_key_is_502_without_the_secret(make_app):
    client = make_app(amplitude_secret_key="not-the-right-secret").test_client()
    r = client.get(f"{RECS}?user_id=testUser&rec_id=a")
    assert r.status_code == 502
    assert r.get_json()["error"]["code"] == "upstream_auth_failed"
    assert b"not-the-right-secret" not in r.data


def test_errors_are_not_cached(client, sandboxes):
    sandboxes.state("amplitude").set_fault("error", count=1)
    failed = client.get(f"{RECS}?user_id=u1&rec_id=a")
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "2"
    r = client.get(f"{RECS}?user_id=u1&rec_id=a")
    assert r.status_code == 200 and r.headers["X-Cache"] == "MISS"


def test_timeout_is_503_with_retry_after(make_app, sandboxes):
    client = make_app(upstream_read_timeout=0.2).test_client()
    sandboxes.state("amplitude").set_fault("slow", seconds=1, count=1)
    r = client.get(f"{RECS}?user_id=slowpoke&rec_id=a")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_timeout"
    assert r.headers["Retry-After"]


def test_upstream_429_is_503_with_retry_after(make_app, sandboxes):
    client = make_app(recommendations_rate_limit_fallback=False).test_client()
    sandboxes.state("amplitude").set_fault("ratelimit", count=1)
    r = client.get(f"{RECS}?user_id=u2&rec_id=a")
    assert r.status_code == 503 and r.headers["Retry-After"] == "30"
    assert r.get_json()["error"]["code"] == "upstream_rate_limited"


def test_rate_limited_recommendations_answer_none_for_now(client, sandboxes):
    """By default a 429 (and the pause it starts) is a 200 with no recommendations and
    `fallback: true`: the template shows its own fallback instead of Braze retrying into a
    Retry-After and aborting. Other endpoints keep their 503."""
    sandboxes.state("amplitude").set_fault("ratelimit", count=1)
    first = client.get(f"{RECS}?user_id=u2&rec_id=a,b")
    paused = client.get(f"{RECS}?user_id=u3&rec_id=a")
    for r in (first, paused):
        assert r.status_code == 200 and r.headers["X-Cache"] == "FALLBACK"
        body = r.get_json()
        assert body["ok"] is True and body["found"] is False and body["fallback"] is True
        assert body["items"] == [] and body["item_count"] == 0 and body["items_joined"] == ""
    assert first.get_json()["recommendations"]["b"]["found"] is False
    assert sandboxes.state("amplitude").calls == 1  # the pause held: the second made no call
    props = client.get("/v1/amplitude/properties?user_id=u4")
    assert props.status_code == 503 and props.get_json()["error"]["code"] == "upstream_rate_limited"


def test_recommendations_failing_otherwise_are_still_503(client, sandboxes):
    sandboxes.state("amplitude").set_fault("error", count=2)  # a 500, and the proxy's one retry
    r = client.get(f"{RECS}?user_id=u5&rec_id=a")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("fault", ["malformed", "oversized", "reset"])
def test_broken_answers_are_503(client, sandboxes, fault):
    sandboxes.state("amplitude").set_fault(fault, count=2)  # count 2: a reset is retried once
    r = client.get(f"{RECS}?user_id=u3&rec_id=a")
    assert r.status_code == 503 and r.get_json()["ok"] is False and r.headers["Retry-After"]


def test_unreachable_upstream_is_503(make_app):
    client = make_app(amplitude_url="http://127.0.0.1:9").test_client()
    r = client.get(f"{RECS}?user_id=u&rec_id=a")
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_unavailable"


def test_credential_changes_the_cache_key(make_app, sandboxes, clock):
    good = make_app().test_client()
    good.get(f"{RECS}?user_id=u&rec_id=a")
    keys = list(good.application.extensions["ccproxy"].cache.store._data.keys())
    assert keys and all("sandbox-amplitude-secret" not in k for k in keys)


def test_non_json_constants_from_upstream_are_refused():
    from proxy.clients.base import _DECODER

    with pytest.raises(ValueError):
        _DECODER.decode('{"userData": {"amp_props": {"x": NaN}}}')


@pytest.mark.parametrize("fault", ["out_of_range", "lone_surrogate"])
def test_an_answer_json_cannot_carry_is_never_cached(make_app, sandboxes, fault):
    """`1e400` and a lone `\\ud800` are valid JSON text that no JSON answer can carry: refused
    as a bad answer (stale or 503), never cached to fail every request for its TTL."""
    client = make_app(cache_max_stale=0).test_client()
    sandboxes.state("amplitude").set_fault(fault, count=1)
    first = client.get(f"{RECS}?user_id=unencodable&rec_id=a")
    assert first.status_code == 503 and first.get_json()["error"]["code"] == "upstream_bad_answer"
    second = client.get(f"{RECS}?user_id=unencodable&rec_id=a")
    assert second.status_code == 200 and second.headers["X-Cache"] == "MISS"
    assert upstream_calls(sandboxes) == 2


@pytest.mark.parametrize("toml, place", [
    ('["/v1/amplitude/recommendations"]\nitems = ["a", inf]\n', "/v1/amplitude/recommendations.items[1]"),
    ('["/v1/adobe-target/profile"]\nprofile = { since = 2024-01-01 }\n', "/v1/adobe-target/profile.profile.since"),
])
def test_fallback_content_json_cannot_carry_is_refused_at_start(make_app, tmp_path, toml, place):
    from proxy.config import SettingsError

    path = tmp_path / "fallbacks.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError, match=re.escape(place)):
        make_app(fallbacks_file=str(path))


def test_an_answer_the_encoder_refuses_is_a_json_500(make_app):
    """Whatever a handler returns, the envelope answers JSON in the stable error shape."""
    from proxy.endpoints import Result, build_registry, endpoint

    @endpoint("/v1/test/unencodable", "a handler whose answer JSON cannot carry")
    def unencodable(_ctx, _args):
        return Result({"ok": True, "when": object()})

    client = make_app(endpoints=build_registry([unencodable])).test_client()
    r = client.get("/v1/test/unencodable")
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal_error"
    assert "Traceback" not in r.get_data(as_text=True)
