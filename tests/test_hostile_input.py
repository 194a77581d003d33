"""Hostile or broken input gets a clear answer, never a 500: a reviewer's findings, each
reproduced here over loopback against the sandboxes."""

from __future__ import annotations

import json

from proxy.clients.base import retry_after_seconds
from proxy.guards import CircuitBreaker

LINK_SECRET = "hostile-link-secret-0123456789"


def test_retry_after_that_is_not_a_finite_number_is_the_default():
    for value in ("inf", "-inf", "1e999", "nan", "NaN"):
        assert retry_after_seconds(value, default=7) == 7
    assert retry_after_seconds("12") == 12 and retry_after_seconds("999999") == 3600


def test_an_infinite_retry_after_neither_fails_the_request_nor_jams_the_breaker(make_app, sandboxes, clock):
    client = make_app(breaker_threshold=1, breaker_reset=0, cache_max_stale=0).test_client()
    state = sandboxes.state("amplitude")
    state.set_fault("unavailable", count=3)
    state.retry_after = "inf"  # the sandbox sends this Retry-After value with its 503
    r = client.get("/v1/amplitude/properties?user_id=ra-inf")
    assert r.status_code == 503 and r.get_json()["error"]["code"].startswith("upstream_")
    state.set_fault("none")
    state.retry_after = None
    breaker = client.application.extensions["ccproxy"].amplitude.breaker
    assert isinstance(breaker, CircuitBreaker) and breaker.probing is False
    clock.advance(3600)  # past any pause the upstream asked for
    assert client.get("/v1/amplitude/properties?user_id=ra-inf2").status_code == 200


def test_a_non_ascii_signature_or_expiry_is_refused_not_a_500(make_app):
    client = make_app(link_secret=LINK_SECRET).test_client()
    for query in ("user_point_id=u1&processing_id=101&accept=false&exp=9999999999&sig=%C3%A9",):
        assert client.get(f"/v1/mediarithmics/consent?{query}").status_code == 403
        assert client.post(f"/v1/mediarithmics/consent?{query}").status_code == 403
    r = client.get("/v1/mediarithmics/consent-link?user_point_id=u1&processing_id=101&accept=false"
                   "&expires=%C2%B2")
    assert r.status_code == 400 and r.get_json()["ok"] is False


def test_json_nested_too_deep_is_a_400(make_app):
    client = make_app(link_secret=LINK_SECRET).test_client()
    deep = "[" * 100_000 + "]" * 100_000
    for method, path in (("post", "/v1/mediarithmics/activities"),
                         ("put", "/v1/mediarithmics/choices?user_point_id=u1&processing_id=101"),
                         ("post", "/v1/preview/liquid")):
        r = getattr(client, method)(path, data=deep, content_type="application/json")
        assert r.status_code == 400, (path, r.status_code)
        assert r.get_json()["error"]["code"] in ("invalid_body", "invalid_activity")
    assert json.loads("[]") == []


def test_one_consent_link_replayed_is_one_write(make_app, sandboxes):
    from test_writes import consent_link

    client = make_app(link_secret=LINK_SECRET).test_client()
    link = consent_link(client, "user_point_id=replayed-1")
    outbox = client.application.extensions["ccproxy"].outbox
    before = outbox.counts()
    for _ in range(20):
        r = client.post(link, data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 200 and b"unsubscribed" in r.data
    after = outbox.counts()
    assert sum(after.values()) - sum(before.values()) == 1


def test_an_old_subscribe_link_cannot_undo_an_unsubscribe_still_queued(make_app, sandboxes):
    from test_writes import consent_link, store_of

    client = make_app(link_secret=LINK_SECRET).test_client()
    subscribe = consent_link(client, "user_point_id=queued-1", accept="true")
    unsubscribe = consent_link(client, "user_point_id=queued-1", accept="false")
    store = store_of(sandboxes)
    store.write_latency = 20.0  # the unsubscribe is accepted but not delivered yet
    try:
        assert client.post(unsubscribe).status_code == 200
        refused = client.post(subscribe)
        assert refused.status_code == 403 and b"changed" in refused.data
    finally:
        store.write_latency = 0.0


def test_a_context_nested_too_deep_is_a_400_naming_it(make_app):
    client = make_app().test_client()
    base = "/v1/experiment/variants?flag_keys=hero-banner&user_id=deep-ctx&context="
    for context in ("[" * 4000 + "]" * 4000,  # past the parser's own recursion limit
                    '{"a":' * 70 + "1" + "}" * 70):  # parsed, but deeper than any real context
        r = client.get(base + context)
        assert r.status_code == 400, r.status_code
        assert r.get_json()["error"]["code"] == "invalid_json" and "deeper" in r.get_json()["error"]["message"]
    assert client.get(base + '{"user_properties":{"a":{"b":1}}}').status_code == 200


def test_a_basic_credential_that_is_not_ascii_is_a_401(make_app):
    client = make_app(api_keys="k1").test_client()
    for value in ("Basic éééé", "Basic ####", "Basic " + "w6k=" * 3):
        r = client.get("/v1/amplitude/properties?user_id=u1", headers={"Authorization": value})
        assert r.status_code == 401 and r.get_json()["ok"] is False, value
