import json
import logging

RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="


def test_request_id_accepted_returned_and_forwarded(client, sandboxes):
    r = client.get(RECS + "rid1", headers={"X-Request-Id": "braze-abc.123"})
    assert r.headers["X-Request-Id"] == "braze-abc.123"
    assert sandboxes.state("amplitude").last_request_id == "braze-abc.123"
    generated = client.get(RECS + "rid2").headers["X-Request-Id"]
    assert len(generated) == 32 and sandboxes.state("amplitude").last_request_id == generated


def test_unsafe_request_id_is_replaced(client, sandboxes):
    r = client.get(RECS + "rid3", headers={"X-Request-Id": "x" * 300})
    assert r.headers["X-Request-Id"] != "x" * 300 and len(r.headers["X-Request-Id"]) == 32


def test_metrics_in_prometheus_format(client, sandboxes):
    client.get(RECS + "m1")
    client.get(RECS + "m1")
    sandboxes.state("amplitude").set_fault("error", count=1)
    client.get(RECS + "m2")
    client.get(RECS + "m3&rec_type=bad")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ccproxy_requests_total{route="/v1/amplitude/recommendations",status="200"} 2.0' in text
    assert 'ccproxy_requests_total{route="/v1/amplitude/recommendations",status="503"} 1.0' in text
    assert 'ccproxy_requests_total{route="/v1/amplitude/recommendations",status="400"} 1.0' in text
    assert 'ccproxy_upstream_calls_total{outcome="200",upstream="amplitude"} 1.0' in text
    assert 'ccproxy_upstream_calls_total{outcome="500",upstream="amplitude"} 1.0' in text
    assert 'ccproxy_cache_lookups_total{result="HIT"' in text
    assert "ccproxy_request_seconds_bucket" in text and "ccproxy_upstream_seconds_bucket" in text
    assert 'ccproxy_breaker_open{upstream="amplitude"' in text
    assert "ccproxy_limiter_rejections_total" in text


def test_json_access_log_without_values_or_secrets(make_app, capsys):
    client = make_app(log_level="INFO").test_client()
    client.get(RECS + "private-user-42", headers={"X-Request-Id": "req-1"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "ccproxy.access"]
    assert access and access[-1]["request_id"] == "req-1" and access[-1]["status"] == 200
    assert access[-1]["params"] == ["rec_id", "user_id"] and access[-1]["cache"] == "MISS"
    assert "private-user-42" not in json.dumps(access)
    assert "sandbox-amplitude-secret" not in json.dumps(lines)
    logging.getLogger("ccproxy").handlers.clear()


def test_an_in_process_call_is_counted_and_logged_apart_from_braze_requests(make_app, capsys):
    """A render's data call: its own metric and access-log line naming the route it served,
    never a ccproxy_requests_total sample (Braze did not ask for it)."""
    client = make_app(log_level="INFO").test_client()
    assert client.get("/v1/render/recs_block?user_id=private-user-7&format=text").status_code == 200
    client.get("/v1/render/recs_block?user_id=private-user-7&format=text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    calls = [line for line in lines if line["logger"] == "ccproxy.access" and line["msg"] == "in-process call"]
    assert [(c["route"], c["within"], c["cache"]) for c in calls] == [
        ("/v1/amplitude/recommendations", "/v1/render/recs_block", "MISS"),
        ("/v1/amplitude/recommendations", "/v1/render/recs_block", "HIT")]
    assert calls[0]["status"] == 200 and "user_id" in calls[0]["params"]
    assert "private-user-7" not in json.dumps(calls)
    text = client.get("/metrics").get_data(as_text=True)
    assert ('ccproxy_inprocess_calls_total{cache="MISS",route="/v1/amplitude/recommendations",status="200"} 1.0'
            in text)
    assert 'ccproxy_requests_total{route="/v1/render/<name>",status="200"} 2.0' in text
    assert 'ccproxy_requests_total{route="/v1/amplitude/recommendations"' not in text
    logging.getLogger("ccproxy").handlers.clear()


def test_answers_are_not_content_sniffed(client):
    for url in ("/healthz", RECS + "sniff", "/preview", "/v1/nope"):
        assert client.get(url).headers["X-Content-Type-Options"] == "nosniff"


def test_every_route_has_a_low_cardinality_label(app):
    envelope = app.wsgi_app
    for rule in app.url_map.iter_rules():
        concrete = rule.rule.replace("<name>", "recs_block").replace("<write_id>", "abc")
        assert envelope.route_of(concrete) != "unmatched", rule.rule


def test_route_labels_come_from_the_url_map_and_keep_their_published_names(app):
    envelope = app.wsgi_app
    assert envelope.route_of("/v1/render/recs_block") == "/v1/render/<name>"
    # Not taken for /v1/render/<name>: the longer prefix wins.
    assert envelope.route_of("/v1/preview/render/recs_block") == "/v1/preview/render/<name>"
    assert envelope.route_of("/v1/mediarithmics/writes/abc") == "/v1/mediarithmics/writes/<id>"
    assert envelope.route_of("/v1/amplitude/properties") == "/v1/amplitude/properties"
    assert envelope.route_of("/v1/amplitude/properties/x") == "unmatched"
