"""The upstream clients' intents (proxy/clients/): what each read asks (its cache identity
and its upstream query), that nothing is sent until the cache asks, the writes' URLs, and
each upstream's one fallback builder, read by the same shapers as real answers."""

from __future__ import annotations

import http.server
import threading

import pytest

from proxy.clients.base import USER_AGENT, Answer, HttpClient, make_pool
from proxy.guards import CircuitBreaker, Guards, RateLimiter, RetryBudget
from proxy.shape import amplitude as amplitude_shape
from proxy.shape import experiment as experiment_shape
from proxy.shape import mediarithmics as mediarithmics_shape
from proxy.shape import target as target_shape


@pytest.fixture
def services(make_app):
    return make_app(start_delivery=False).extensions["ccproxy"]


def test_amplitude_intents_carry_amplitudes_own_flags(services):
    amplitude = services.amplitude
    recs = amplitude.recommendations("u1", "", ["b", "a"], "model")
    assert recs.operation == "userprofile" and recs.client is amplitude
    # Sorted rec ids: rec_id=a,b and rec_id=b,a are one cache entry.
    assert recs.params == {"user_id": "u1", "get_recs": "true", "rec_id": "a,b", "rec_type": "model"}
    assert amplitude.recommendations("u1", "", ["a", "b"]).params["rec_id"] == "a,b"
    assert amplitude.properties("", "d1").params == {"device_id": "d1", "get_amp_props": "true"}
    assert amplitude.computations("u1", "", "c7").params == {"user_id": "u1", "comp_id": "c7"}
    assert amplitude.computations("u1", "").params == {"user_id": "u1", "get_computations": "true"}
    assert amplitude.cohorts("u1", "").params == {"user_id": "u1", "get_cohort_ids": "true"}
    assert amplitude.profile("u1", "").params == {
        "user_id": "u1", "get_amp_props": "true", "get_cohort_ids": "true", "get_computations": "true"}
    assert amplitude.profile("u1", "", ["r"], "random").params["rec_type"] == "random"


def test_a_query_is_sent_only_when_asked(services, sandboxes):
    query = services.amplitude.properties("testUser", "")
    assert sandboxes.state("amplitude").calls == 0
    answer = query.send()
    assert sandboxes.state("amplitude").calls == 1
    assert isinstance(answer, Answer) and isinstance(answer.data.get("amp_props"), dict)
    assert "get_amp_props=true" in sandboxes.state("amplitude").last_uri


def test_experiment_variants_track_and_context_are_part_of_what_is_asked(services):
    experiment = services.experiment
    tracked = experiment.variants("u", "", ["b", "a"], {"z": 1, "a": {"y": 2}}, True)
    untracked = experiment.variants("u", "", ["a", "b"], {"a": {"y": 2}, "z": 1}, False)
    assert (tracked.operation, untracked.operation) == ("vardata", "vardata-no-track")
    # Canonical context and sorted flags: equal evaluations are one cache entry per tracking mode.
    assert tracked.params == untracked.params == {
        "user_id": "u", "flag_keys": "a,b", "context": '{"a":{"y":2},"z":1}'}


def test_target_and_mediarithmics_reads_name_their_selector(services):
    assert services.target.profile(tntid="t-1").params == {"tntid": "t-1"}
    assert services.target.profile(third_party_id="c/1").params == {"third_party_id": "c/1"}
    mediarithmics = services.mediarithmics
    assert mediarithmics.profiles({"email_hash": "abc"}).operation == "user_profiles"
    assert mediarithmics.choices({"email_hash": "abc"}).params == {"email_hash": "abc"}
    assert mediarithmics.choices({"email_hash": "abc"}, "101").params == {
        "email_hash": "abc", "processing_id": "101"}
    history = mediarithmics.choice_history({"user_point_id": "up"}, "102")
    assert (history.operation, history.params) == ("choice_change_log", {"user_point_id": "up", "processing_id": "102"})


def test_mediarithmics_writes_encode_every_path_part(services):
    mediarithmics = services.mediarithmics
    choice = mediarithmics.put_choice({"user_account_id": "a/b", "compartment_id": "1"}, "101",
                                      {"$choice_acceptance_value": True})
    assert choice.method == "PUT" and choice.query == {}
    assert choice.path == ("/v1/datamarts/1509/user_points/user_account_id=a%2Fb,compartment_id=1"
                           "/user_choices/processing_id=101")
    assert choice.path == mediarithmics.choice_path({"user_account_id": "a/b", "compartment_id": "1"}, "101")
    profile = mediarithmics.put_profile({"user_point_id": ".."}, "1", "acc 1", {"x": 1}, False, True)
    assert profile.path == ("/v1/datamarts/1509/user_points/user_point_id=%2E%2E/user_profiles/"
                            "compartment_id=1/user_account_id=acc%201")
    assert profile.query == {"force_replace": "false", "merge_objects": "true"}
    # merge_objects only counts when not replacing (mediarithmics docs).
    assert mediarithmics.put_profile({"user_point_id": "u"}, "1", "a", {}, True, False).query == {
        "force_replace": "true"}
    activity = mediarithmics.post_activity({"$type": "TOUCH"})
    assert (activity.method, activity.path, activity.body) == (
        "POST", "/v1/datamarts/1509/user_activities", {"$type": "TOUCH"})


def test_each_upstream_builds_its_fallback_as_it_would_answer(services):
    content = {"items": ["Gift card"], "properties": {"tier": "gold"}, "computations": {"ltv": 3},
               "cohort_ids": ["c1"]}
    query = services.amplitude.recommendations("u1", "", ["r2", "r1"])
    data = services.amplitude.fallback(query, content)
    recs = amplitude_shape.recommendations(data, ["r2", "r1"], "u1", "")
    assert recs["item_1"] == "Gift card" and recs["source"] == "fallback"
    assert recs["recommendations"]["r1"]["item_1"] == "Gift card"
    props = amplitude_shape.properties(services.amplitude.fallback(services.amplitude.properties("u1", ""), content))
    assert props["properties"] == {"tier": "gold", "ltv": 3}

    vardata = services.experiment.fallback(
        services.experiment.variants("u", "", ["hero"], {}, False),
        {"variants": {"hero": "spring"}, "payloads": {"hero": {"headline": "Hi"}}})
    variants = experiment_shape.variants(vardata, ["hero", "other"], "u", "", False)
    assert variants["variants"] == {"hero": "spring", "other": "off"}

    target = services.target.fallback(services.target.profile(tntid="t"), {"profile": {"user.tier": 2}})
    assert target_shape.profile(target, "t", "")["profile"] == {"user_tier": "2"}

    mediarithmics = services.mediarithmics
    choices = mediarithmics.fallback(mediarithmics.choices({"email_hash": "h"}, "101"), {"choices": {"101": False}})
    assert mediarithmics_shape.choices(choices, "101")["choices"] == {"processing_101": False}
    profile = mediarithmics.fallback(mediarithmics.profiles({"email_hash": "h"}), {"profile": {"tier": "gold"}})
    assert mediarithmics_shape.profile(profile)["profile"] == {"tier": "gold"}
    # A choice's change log has no operator stand-in.
    assert mediarithmics.fallback(mediarithmics.choice_history({"email_hash": "h"}, "101"), {"choices": {}}) is None


FALLBACKS = """
["/v1/adobe-target/profile"]
profile = { "user.memberlevel" = "gold" }

["/v1/mediarithmics/choices"]
choices = { "101" = false }

["/v1/mediarithmics/choices/history"]
choices = { "101" = false }
"""


def test_the_registration_path_names_the_fallback_content(make_app, sandboxes, tmp_path):
    path = tmp_path / "fallbacks.toml"
    path.write_text(FALLBACKS)
    client = make_app(fallbacks_file=str(path), cache_max_stale=0).test_client()
    sandboxes.state("target").set_fault("error")
    target = client.get("/v1/adobe-target/profile?tntid=fb-1")
    assert target.status_code == 200 and target.headers["X-Cache"] == "FALLBACK"
    assert target.get_json()["profile"] == {"user_memberlevel": "gold"}
    sandboxes.state("mediarithmics").set_fault("error")
    choices = client.get("/v1/mediarithmics/choices?email_hash=fb-2&processing_id=101")
    assert choices.status_code == 200 and choices.get_json()["choices"] == {"processing_101": False}
    # The change log's client builds no fallback: content under its path changes nothing.
    history = client.get("/v1/mediarithmics/choices/history?email_hash=fb-2&processing_id=101")
    assert history.status_code == 503 and history.get_json()["ok"] is False


# The wire: what an upstream (or an egress proxy) receives from a client ------------------

class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers `{}` to any GET and records its request line, headers and connection."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append({"target": self.path, "headers": dict(self.headers), "peer": self.client_address})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


def _client(pool, base_url: str) -> HttpClient:
    guards = Guards(CircuitBreaker("t", 5, 30.0), RateLimiter("t", 0.0), RetryBudget())
    return HttpClient(pool, base_url, guards=guards, connect_timeout=5.0, read_timeout=10.0, max_bytes=1 << 20)


def test_a_call_keeps_the_base_path_and_names_the_proxy(recorder):
    url, seen = recorder
    client = _client(make_pool(), url + "/prefix/v1/")
    assert client.request("GET", "/thing/a%2Fb", params={"q": "x y", "n": "1"}) == (200, {})
    assert seen[0]["target"] == "/prefix/v1/thing/a%2Fb?q=x+y&n=1"
    # The pool's default User-Agent applied only to calls without headers of their own.
    assert seen[0]["headers"]["User-Agent"] == USER_AGENT
    client.request("GET", "/thing", headers={"Authorization": "k"})
    assert seen[1]["headers"]["User-Agent"] == USER_AGENT and seen[1]["headers"]["Authorization"] == "k"
    assert seen[0]["peer"] == seen[1]["peer"]  # one kept-alive connection from the origin's pool


def test_through_an_egress_proxy_the_target_is_the_whole_url(recorder):
    url, seen = recorder
    client = _client(make_pool(proxy=url), "http://upstream.invalid/v1")
    assert client.request("GET", "/profiles/7", params={"client": "c"}) == (200, {})
    assert seen[0]["target"] == "http://upstream.invalid/v1/profiles/7?client=c"
    assert seen[0]["headers"]["User-Agent"] == USER_AGENT
