"""proxy/middleware.py: the per-request envelope (request id, auth, methods, labels) and
its query parsing, driven as WSGI through the app."""

from __future__ import annotations

from proxy.middleware import query_args, route_of

PROPS = "/v1/amplitude/properties?user_id=testUser"


def test_query_args_take_the_first_value_and_keep_blanks():
    assert query_args("a=1&a=2&b=&c") == {"a": "1", "b": "", "c": ""}
    assert query_args("user_id=%E9t%C3%A9") == {"user_id": "\ufffdt\u00e9"}  # bad UTF-8 replaced
    assert query_args("") == {}


def test_route_of_prefers_exact_routes_then_the_longest_prefix():
    prefixes = [("/v1/preview/render/", "/v1/preview/render/<name>"), ("/v1/", "/v1/<any>")]
    assert route_of("/v1/x", frozenset({"/v1/x"}), prefixes) == "/v1/x"
    assert route_of("/v1/preview/render/a", frozenset(), prefixes) == "/v1/preview/render/<name>"
    assert route_of("/other", frozenset(), prefixes) == "unmatched"


def test_a_request_id_is_echoed_or_made(client):
    given = client.get(PROPS, headers={"X-Request-Id": "abc-123"})
    assert given.headers["X-Request-Id"] == "abc-123"
    made = client.get(PROPS).headers["X-Request-Id"]
    assert made and made != "abc-123"
    assert client.get(PROPS, headers={"X-Request-Id": "bad id\x7f" * 20}).headers["X-Request-Id"] != "bad id\x7f" * 20


def test_a_data_path_shared_with_a_write_lists_both_in_allow(client):
    options = client.options("/v1/mediarithmics/choices")
    assert options.status_code == 200 and options.headers["Allow"] == "GET, HEAD, OPTIONS, PUT"
    refused = client.post("/v1/mediarithmics/choices?email_hash=h")
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD, OPTIONS, PUT"
    assert refused.get_json()["ok"] is False
    # PUT goes on to the Flask write route (a 400 for its missing body, not a 405).
    assert client.put("/v1/mediarithmics/choices?email_hash=h&processing_id=101").status_code == 400


def test_head_has_the_get_headers_and_no_body(client):
    get, head = client.get(PROPS), client.head(PROPS)
    assert head.status_code == get.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(len(get.data))
    assert head.headers["Content-Type"] == get.headers["Content-Type"]


def test_each_request_is_counted_under_its_route(app):
    client = app.test_client()
    client.get(PROPS)
    client.get("/v1/render/nope?user_id=u")
    client.get("/v1/nowhere")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ccproxy_requests_total{route="/v1/amplitude/properties",status="200"} 1.0' in text
    assert 'ccproxy_requests_total{route="/v1/render/<name>",status="404"} 1.0' in text
    assert 'ccproxy_requests_total{route="unmatched",status="404"} 1.0' in text
