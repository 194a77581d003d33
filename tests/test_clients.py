"""The upstream clients' intents (proxy/clients/): what each read asks (its cache identity
and its upstream query), that nothing is sent until the cache asks, the writes' URLs, and
each upstream's one fallback builder, read by the same shapers as real answers."""

from __future__ import annotations

import pytest

from proxy.clients.base import Answer
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
