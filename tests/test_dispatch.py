"""One dispatch: every data endpoint answers the same status, headers and bytes through the
WSGI fast path (GET), HEAD (no body) and the in-process call that templates and previews use;
the registry is their only router."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

import pytest

from proxy import dispatch
from proxy.endpoints import build_registry, call
from proxy.errors import BadRequest, InternalError, ProxyError
from proxy.responses import json_bytes

REGISTRY = build_registry()
ENDPOINTS = sorted(REGISTRY)
# The envelope's own headers (added to every answer); everything else must match.
ENVELOPE = {"X-Request-Id", "X-Content-Type-Options"}
UPSTREAM = {"amplitude": "amplitude", "experiment": "experiment", "mediarithmics": "mediarithmics",
            "adobe-target": "target"}


@pytest.fixture
def logged():
    """What the proxy logs (its logger does not propagate to pytest's caplog); request it
    after the app is built, as create_app sets the logger's handlers."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("ccproxy")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _upstream_failures(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("upstream failure:")]


def _args(path: str) -> dict[str, str]:
    # Experiment with track=false: the only form whose answers may repeat (previews force it).
    return {**dict(parse_qsl(REGISTRY[path].example)), **({"track": "false"} if "experiment" in path else {})}


def _query(args: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in args.items())


def _headers(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in ENVELOPE}


def _three_ways(app, path: str, args: dict[str, str]):
    """(status, headers, body bytes) by GET, by HEAD and by the in-process call."""
    client = app.test_client()
    got = client.get(f"{path}?{_query(args)}")
    head = client.head(f"{path}?{_query(args)}")
    services = app.extensions["ccproxy"]
    with app.test_request_context():
        try:
            done = call(services, path, args)
            in_process = (done.status, done.headers, json_bytes(done.body))
        except BadRequest as refused:  # raised in-process: the caller's input is wrong
            status, headers, body = dispatch.http_answer(refused)
            in_process = (status, headers, json_bytes(body))
    return ((got.status_code, _headers(got), got.data),
            (head.status_code, _headers(head), head.data), in_process)


def _assert_same(way_get, way_head, way_call, status: int):
    assert way_get[0] == way_head[0] == way_call[0] == status
    assert way_head[2] == b""  # HEAD: no body ...
    assert way_head[1] == way_get[1]  # ... and the GET's headers, Content-Length included
    assert way_get[1]["Content-Length"] == str(len(way_get[2]))
    wire = {k: v for k, v in way_get[1].items() if k not in ("Content-Type", "Content-Length")}
    assert wire == way_call[1]
    assert way_call[2] == way_get[2]  # byte-identical bodies


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_path_answers_the_same(make_app, sandboxes, path):
    app = make_app()
    args = _args(path)
    app.test_client().get(f"{path}?{_query(args)}")  # fill the cache: the three ways all HIT
    way_get, way_head, way_call = _three_ways(app, path, args)
    _assert_same(way_get, way_head, way_call, 200)
    assert way_get[1].get("X-Cache") == "HIT"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_bad_request_is_the_same_400_every_way(make_app, path):
    app = make_app()
    way_get, way_head, way_call = _three_ways(app, path, {"user_id": "x" * 5000})
    _assert_same(way_get, way_head, way_call, 400)
    assert b'"ok":false' in way_get[2]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_an_upstream_failure_is_the_same_503_every_way(make_app, sandboxes, path, request):
    app = make_app(breaker_threshold=1000)  # every way reaches the failing upstream
    logged = request.getfixturevalue("logged")  # after create_app, which sets the log handlers
    sandboxes.state(UPSTREAM[path.split("/")[2]]).set_fault("error")
    way_get, way_head, way_call = _three_ways(app, path, _args(path))
    _assert_same(way_get, way_head, way_call, 503)
    assert "Retry-After" in way_get[1]
    assert len(_upstream_failures(logged)) == 3  # logged once per way, never silently


def test_an_upstream_failure_inside_a_render_is_logged(client, sandboxes, logged):
    sandboxes.state("amplitude").set_fault("error")
    r = client.get("/v1/render/recs_block?user_id=bob&format=text")
    assert r.status_code == 200  # the template's fallback
    assert [m for m in _upstream_failures(logged)
            if "upstream=amplitude" in m and "path=/v1/amplitude/recommendations" in m]


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_other_methods_on_a_data_endpoint_are_a_json_405_with_allow(client, method):
    r = client.open("/v1/amplitude/recommendations?user_id=u&rec_id=r", method=method)
    assert r.status_code == 405
    assert r.get_json() == {"ok": False, "error": {"code": "method_not_allowed",
                                                   "message": "method not allowed on this endpoint"}}
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_a_data_path_shared_with_a_write_keeps_both(client):
    """PUT /v1/mediarithmics/profile is a Flask write; GET is the data endpoint."""
    r = client.open("/v1/mediarithmics/profile?user_point_id=up-1", method="DELETE")
    assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "HEAD", "PUT"}
    assert client.get("/v1/mediarithmics/profile?user_point_id=up-1").status_code == 200
    options = client.options("/v1/mediarithmics/profile")
    assert options.status_code == 200 and "PUT" in options.headers["Allow"]


def test_flask_routes_answer_405_with_allow_too(client):
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]


def test_no_flask_view_for_a_data_endpoint(app):
    rules = {rule.rule: rule.methods for rule in app.url_map.iter_rules()}
    for path in ENDPOINTS:
        assert "GET" not in rules.get(path, set()), path


def test_data_endpoints_have_their_own_metric_route(client):
    client.head("/v1/amplitude/properties?user_id=testUser")
    exposition = client.get("/metrics").get_data(as_text=True)
    assert 'route="/v1/amplitude/properties"' in exposition
    assert 'route="unmatched"' not in exposition


def test_status_lines_come_from_http_status():
    assert dispatch.status_line(405) == "405 Method Not Allowed"
    assert dispatch.status_line(413) == "413 Request Entity Too Large"
    assert dispatch.status_line(429) == "429 Too Many Requests"
    assert dispatch.status_line(599) == "599 Unknown"


def test_an_unexpected_failure_is_the_one_internal_error(logged):
    def broken(services, args):
        raise RuntimeError("secret detail")

    endpoint = REGISTRY["/v1/amplitude/properties"]
    outcome = dispatch.run(type(endpoint)(endpoint.path, broken, "broken"), None, {}, endpoint.path)
    assert isinstance(outcome, InternalError)
    status, headers, body = dispatch.http_answer(outcome)
    assert (status, headers) == (500, {})
    assert body == {"ok": False, "error": {"code": "internal_error", "message": "the proxy failed; see its logs"}}
    assert isinstance(outcome, ProxyError) and "secret detail" not in json_bytes(body).decode()
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in logged)  # the log has it


def test_the_401_is_compact_json(make_app):
    client = make_app(api_keys="k1").test_client()
    r = client.get("/v1/amplitude/properties?user_id=u")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert r.data == json_bytes(r.get_json())
    assert r.headers["Content-Length"] == str(len(r.data))
