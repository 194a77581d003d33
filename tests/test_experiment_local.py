"""Local experiment evaluation (issue 16): the same answers as remote evaluation, from flag
configurations fetched through the proxy's own client and evaluated with Amplitude's engine,
without one `/v1/vardata` call per recipient."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from urllib.parse import quote

import pytest
import requests

from proxy import config

URL = "/v1/experiment/variants"
SANDBOX_FLAGS = ["checkout-button", "hero-banner", "premium-upsell"]
COMPARED = ("variants", "payloads", "flag_count", "found", "user_id", "device_id")


def vardata_calls(sandboxes) -> int:
    return sandboxes.state("experiment").paths["/v1/vardata"]


def set_flags(sandboxes, flags) -> None:
    url = sandboxes.servers["experiment"].url
    requests.post(f"{url}/__sandbox/flags", json=flags, timeout=5).raise_for_status()


def fail_flags(sandboxes, status: int) -> None:
    url = sandboxes.servers["experiment"].url
    requests.post(f"{url}/__sandbox/flags/fail", json={"status": status}, timeout=5).raise_for_status()


def local_app(make_app, **overrides):
    """A local-mode app whose first flag configuration is loaded."""
    app = make_app(experiment_mode="local", **overrides)
    store = app.extensions["ccproxy"].flag_store
    store.current()
    store.wait(10)
    return app


def users(count: int = 200) -> list[str]:
    """Query strings for `count` users: ids bucketed by hash, forced arms, outsiders, device-only
    users, with and without the premium property (always sent: locally decidable)."""
    kinds = ["user_id=u-{i}", "user_id=treatment-{i}", "user_id=control-{i}", "user_id=outsider-{i}",
             "device_id=d-{i}", "user_id=u-{i}&device_id=d-{i}"]
    queries = []
    for i in range(count):
        who = kinds[i % len(kinds)].format(i=i)
        premium = "true" if i % 3 == 0 else "false"
        queries.append(f"{who}&user_properties.premium={premium}")
    return queries


def compared(body: dict) -> dict:
    return {k: body[k] for k in COMPARED}


def test_200_users_every_sandbox_flag_local_equals_remote_with_no_vardata_call(make_app, sandboxes):
    remote = make_app().test_client()
    local = local_app(make_app).test_client()
    flags = ",".join(SANDBOX_FLAGS)
    expected = {}
    for query in users():
        r = remote.get(f"{URL}?{query}&flag_keys={flags}&track=false")
        assert r.status_code == 200
        expected[query] = compared(r.get_json())
    before = vardata_calls(sandboxes)
    assigned = set()
    for query in users():
        body = local.get(f"{URL}?{query}&flag_keys={flags}&track=false").get_json()
        assert compared(body) == expected[query], query
        assigned.update(f"{f}={v}" for f, v in body["variants"].items())
    assert vardata_calls(sandboxes) == before  # 200 distinct users, 0 remote evaluations
    # Not a vacuous comparison: every arm of every flag appears.
    assert {"checkout_button=control", "checkout_button=treatment", "hero_banner=spring-sale",
            "hero_banner=summer-sale", "premium_upsell=on", "premium_upsell=off"} <= assigned


def test_all_flags_without_flag_keys_agree_too(make_app, sandboxes):
    remote = make_app().test_client()
    local = local_app(make_app).test_client()
    before = vardata_calls(sandboxes)
    for query in users(30):
        want = compared(remote.get(f"{URL}?{query}&track=false").get_json())
        before += 1
        assert compared(local.get(f"{URL}?{query}&track=false").get_json()) == want
    assert vardata_calls(sandboxes) == before


def test_local_answers_send_no_assignment_event(make_app, sandboxes):
    """Amplitude records no assignment for a local answer (exposure events are the proxy's own:
    tests/test_experiment_exposures.py)."""
    local = local_app(make_app).test_client()
    body = local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button").get_json()
    assert body["variants"] == {"checkout_button": "treatment"} and body["tracked"] is True
    body = local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button&track=false").get_json()
    assert body["tracked"] is False
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 0


def _bucket(field, salt, arms, allocation=(0, 100)):
    step = 42949673 // len(arms)
    return {"selector": ["context", "user", field], "salt": salt, "allocations": [{
        "range": list(allocation), "distributions": [
            {"variant": a, "range": [i * step, 42949673 if i == len(arms) - 1 else (i + 1) * step]}
            for i, a in enumerate(arms)]}]}


def _flag(key, arms, segments, dependencies=None, **metadata):
    flag = {"key": key, "metadata": {"deployed": True, "evaluationMode": "local", **metadata},
            "segments": segments + [{"variant": "off"}],
            "variants": {"off": {"key": "off", "metadata": {"default": True}},
                         **{a: {"key": a, "value": a, "payload": {"arm": a}} for a in arms}}}
    if dependencies:
        flag["dependencies"] = dependencies
    return flag


UNSEEN_FLAGS = [
    _flag("parent", ["on"], [{"bucket": _bucket("user_id", "p", ["on"], (0, 50))}]),
    _flag("child", ["yes", "no"], [{"conditions": [[{"selector": ["result", "parent", "key"], "op": "is",
                                                    "values": ["on"]}]], "variant": "yes"},
                                   {"bucket": _bucket("user_id", "c", ["no"], (0, 40))}],
          dependencies=["parent"]),
    _flag("by-device", ["a", "b", "c"], [{"bucket": _bucket("device_id", "d", ["a", "b", "c"])}]),
    _flag("partial", ["treatment"], [{"bucket": _bucket("user_id", "r", ["treatment"], (0, 30))}]),
    _flag("by-property", ["gold"], [{"conditions": [[{"selector": ["context", "user", "user_properties", "plan"],
                                                      "op": "is", "values": ["gold"]}]], "variant": "gold"}]),
    _flag("by-country", ["fr"], [{"conditions": [[{"selector": ["context", "user", "country"],
                                                   "op": "is", "values": ["FR"]}]], "variant": "fr"}]),
    _flag("remote-only", ["on"], [{"variant": "on"}], evaluationMode="remote"),
    _flag("by-cohort", ["in"], [{"conditions": [[{"selector": ["context", "user", "cohort_ids"],
                                                  "op": "set contains any", "values": ["c1"]}]], "variant": "in"}]),
]
LOCAL_UNSEEN = ["parent", "child", "by-device", "partial", "by-property", "by-country"]


def _unseen_query(i: int) -> str:
    context = {"country": "FR" if i % 2 else "DE", "user_properties": {"plan": "gold" if i % 3 else "free"}}
    return f"user_id=v-{i}&device_id=dev-{i}&context={quote(json.dumps(context))}"


def test_configurations_the_code_was_not_written_against(make_app, sandboxes):
    set_flags(sandboxes, UNSEEN_FLAGS)
    remote = make_app().test_client()
    local = local_app(make_app).test_client()
    every = ",".join(f["key"] for f in UNSEEN_FLAGS)
    seen: dict[str, set] = {}
    before = vardata_calls(sandboxes)
    remote_answers = {i: compared(remote.get(f"{URL}?{_unseen_query(i)}&flag_keys={every}&track=false")
                                  .get_json()) for i in range(200)}
    before = vardata_calls(sandboxes)
    for i in range(200):
        body = local.get(f"{URL}?{_unseen_query(i)}&flag_keys={','.join(LOCAL_UNSEEN)}&track=false").get_json()
        want = {k: v for k, v in remote_answers[i]["variants"].items() if k.replace("_", "-") in LOCAL_UNSEEN}
        assert body["variants"] == want
        for flag, variant in body["variants"].items():
            seen.setdefault(flag, set()).add(variant)
    assert vardata_calls(sandboxes) == before  # all of them decided locally
    # Dependency, device bucketing, partial rollout, property and field conditions all bite.
    assert seen["child"] == {"yes", "no", "off"} and seen["parent"] == {"on", "off"}
    assert seen["by_device"] == {"a", "b", "c"} and seen["partial"] == {"treatment", "off"}
    assert seen["by_property"] == {"gold", "off"} and seen["by_country"] == {"fr", "off"}
    # With the flags local evaluation cannot decide: one no-track remote call each, same answers.
    for i in range(20):
        body = local.get(f"{URL}?{_unseen_query(i)}&flag_keys={every}").get_json()
        assert compared(body) == remote_answers[i]
        assert body["variants"]["remote_only"] == "on"
    assert vardata_calls(sandboxes) == before + 20
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 0


def test_flags_needing_what_the_request_did_not_send_go_remote(make_app, sandboxes):
    set_flags(sandboxes, UNSEEN_FLAGS)
    local = local_app(make_app).test_client()
    before = vardata_calls(sandboxes)
    # No `plan` property, no country, no device id: Amplitude may know them, so remote decides.
    for flag in ("by-property", "by-country"):
        local.get(f"{URL}?user_id=w-1&flag_keys={flag}")
    assert vardata_calls(sandboxes) == before + 2
    # The sandbox flags: premium-upsell without the premium property goes remote too.
    set_flags(sandboxes, None)
    local = local_app(make_app).test_client()
    before = vardata_calls(sandboxes)
    assert local.get(f"{URL}?user_id=w-2&flag_keys=premium-upsell").get_json()["variants"] == {"premium_upsell": "off"}
    assert local.get(f"{URL}?user_id=w-2&flag_keys=checkout-button").status_code == 200
    assert local.get(f"{URL}?user_id=w-2&flag_keys=not-configured").get_json()["variants"] == {"not_configured": "off"}
    assert vardata_calls(sandboxes) == before + 2  # premium-upsell and the unknown flag


def test_a_configuration_change_is_picked_up_within_one_refresh(make_app, sandboxes, clock):
    app = local_app(make_app)
    local, store = app.test_client(), app.extensions["ccproxy"].flag_store
    assert local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button").get_json()["variants"] == {
        "checkout_button": "treatment"}
    killed = [f for f in json.loads(json.dumps(UNSEEN_FLAGS)) if f["key"] == "partial"]
    killed[0]["key"] = "checkout-button"
    killed[0]["segments"] = [{"variant": "off"}]
    set_flags(sandboxes, killed)
    clock.advance(10)  # within the interval: the configuration in hand is still used
    assert local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button").get_json()["variants"] == {
        "checkout_button": "treatment"}
    assert store.refreshes == 1
    clock.advance(21)  # one refresh interval (30 s) after the fetch
    local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button")  # starts the refresh
    store.wait(10)
    assert store.refreshes == 2
    before = vardata_calls(sandboxes)
    assert local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button").get_json()["variants"] == {
        "checkout_button": "off"}
    assert vardata_calls(sandboxes) == before


def test_failed_refresh_keeps_the_last_good_configuration_up_to_max_age(make_app, sandboxes, clock):
    app = local_app(make_app)
    local, store = app.test_client(), app.extensions["ccproxy"].flag_store
    fail_flags(sandboxes, 500)
    before = vardata_calls(sandboxes)
    clock.advance(31)
    local.get(f"{URL}?user_id=u-1&flag_keys=checkout-button")
    store.wait(10)
    assert store.failures == 1 and store.refreshes == 1
    body = local.get(f"{URL}?user_id=treatment-1&flag_keys=checkout-button&track=false").get_json()
    assert body["variants"] == {"checkout_button": "treatment"} and body["tracked"] is False
    assert vardata_calls(sandboxes) == before  # still local on the last good configuration
    ready = local.get("/readyz").get_json()
    assert ready["experiment_flags"]["usable"] is True and ready["experiment_flags"]["age_seconds"] == 31.0
    assert ready["experiment_flags"]["failures"] >= 1
    scrape = local.get("/metrics").get_data(as_text=True)
    assert "ccproxy_experiment_flags_age_seconds 31.0" in scrape  # the age a dashboard alerts on
    store.wait(10)
    clock.advance(270)  # 301 s old: too old to trust (a killed flag must not live forever)
    body = local.get(f"{URL}?user_id=treatment-2&flag_keys=checkout-button").get_json()
    store.wait(10)
    assert body["variants"] == {"checkout_button": "treatment"} and body["tracked"] is True
    assert vardata_calls(sandboxes) == before + 1  # remote evaluation, as asked (tracked)
    ready = local.get("/readyz").get_json()
    assert "experiment_flags_stale" in [r["code"] for r in ready["reasons"]] and ready["ready"] is True
    # The Flags API answers again: the next refresh brings local evaluation back.
    fail_flags(sandboxes, 0)
    store.wait(10)
    clock.advance(31)
    local.get(f"{URL}?user_id=u-3&flag_keys=checkout-button")
    store.wait(10)
    assert store.refreshes == 2
    calls = vardata_calls(sandboxes)
    local.get(f"{URL}?user_id=u-4&flag_keys=checkout-button")
    assert vardata_calls(sandboxes) == calls


def test_no_configuration_yet_means_remote_evaluation(make_app, sandboxes):
    fail_flags(sandboxes, 503)
    app = make_app(experiment_mode="local")
    client, store = app.test_client(), app.extensions["ccproxy"].flag_store
    body = client.get(f"{URL}?user_id=treatment-5&flag_keys=checkout-button&track=false").get_json()
    store.wait(10)
    assert body["variants"] == {"checkout_button": "treatment"}
    assert vardata_calls(sandboxes) == 1 and store.state()["loaded"] is False
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["experiment_flags"]["age_seconds"] is None
    assert "experiment_flags_stale" in [r["code"] for r in ready.get_json()["reasons"]]


def test_remote_mode_fetches_no_flag_configuration(make_app, sandboxes):
    client = make_app().test_client()
    client.get(f"{URL}?user_id=u-1&flag_keys=checkout-button")
    assert sandboxes.state("experiment").paths["/sdk/v2/flags"] == 0
    assert "experiment_flags" not in client.get("/readyz").get_json()


def test_flags_api_urls_by_region_and_setting_checks(make_app):
    for region, url in (("us", "https://api.lab.amplitude.com"), ("eu", "https://flag.lab.eu.amplitude.com")):
        services = make_app(experiment_flags_url="", experiment_region=region).extensions["ccproxy"]
        assert services.experiment_flags.base_url == url
    for bad in ({"experiment_mode": "hybrid"}, {"experiment_flag_refresh": 0},
                {"experiment_flag_refresh": 600, "experiment_flag_max_age": 300}):
        with pytest.raises(config.SettingsError):
            config.load(overrides=bad, environ={})


def test_the_engine_is_not_imported_with_the_app():
    """Nothing may load the SDK (and ssl with it) in the gunicorn master before gevent patches."""
    code = ("import sys, proxy.app, proxy.services, proxy.endpoints.experiment, proxy.readiness; "
            "import proxy.exposures, proxy.clients.analytics; "
            "sys.exit('amplitude_experiment' in sys.modules or 'amplitude' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_two_gevent_workers_each_load_flags_and_make_no_vardata_call(sandboxes, tmp_path):
    """Under `ccproxy serve` (gunicorn, gevent, forked workers) each worker fetches its own
    configuration in the background (per process), then 200 users cost no remote evaluation."""
    from ccproxy_serve import serving
    from servers import wait_for

    ready_workers: set[int] = set()

    def both_loaded() -> bool:
        # A new connection each time, so the probes reach every worker; each probe starts a
        # due refresh in the worker it reaches.
        body = requests.get(f"{base}/readyz", timeout=10).json()
        if body.get("experiment_flags", {}).get("usable"):
            ready_workers.add(body["worker"])
        return len(ready_workers) == 2

    env = {"CCPROXY_EXPERIMENT_MODE": "local", "CCPROXY_EXPERIMENT_FLAG_REFRESH": "300",
           "CCPROXY_EXPERIMENT_FLAG_MAX_AGE": "600"}
    exposed = 0
    with serving(sandboxes, tmp_path / "serve.log", env, workers=2) as (base, _proc):
        wait_for(both_loaded, seconds=90, poll=0.02, what="both workers loading their flags")
        state = sandboxes.state("experiment")
        assert state.paths["/sdk/v2/flags"] == 2  # one fetch per worker
        before = state.paths["/v1/vardata"]
        for query in users():
            r = requests.get(f"{base}{URL}?{query}&flag_keys={','.join(SANDBOX_FLAGS)}", timeout=10)
            assert r.status_code == 200 and r.json()["tracked"] is True
            if "treatment-" in query:
                assert r.json()["variants"]["checkout_button"] == "treatment"
            exposed += sum(1 for v in r.json()["variants"].values() if v != "off")
        assert state.paths["/v1/vardata"] == before
    # The workers' SDK threads ran under gevent and their exit flushed what was still buffered:
    # one exposure event per assigned flag and user, none lost, none twice.
    events = requests.get(f"{sandboxes.servers['amplitude'].url}/__sandbox/events", timeout=10).json()
    assert exposed > 200 and len(events["events"]) == exposed == events["ingested"]


def test_the_renders_of_one_message_are_evaluated_once(make_app, sandboxes, monkeypatch):
    """Braze renders a message several times: the same user, context and flags are evaluated
    once per configuration (the memo), with the same answer every time."""
    from amplitude_experiment.evaluation.engine import EvaluationEngine

    app = local_app(make_app)
    client, config = app.test_client(), app.extensions["ccproxy"].flag_store.current()
    evaluations = []
    original = EvaluationEngine.evaluate
    monkeypatch.setattr(EvaluationEngine, "evaluate",
                        lambda self, *a: evaluations.append(1) or original(self, *a))
    query = f"{URL}?user_id=u-memo-1&flag_keys=checkout-button,hero-banner,premium-upsell&track=false"
    bodies = [client.get(f"{query}&user_properties.premium=true").get_json() for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2] and bodies[0]["variants"]["premium_upsell"] == "on"
    assert len(evaluations) == 1 and len(config.memo.decisions) == 1
    # Another context is another evaluation (and answer).
    other = client.get(f"{query}&user_properties.premium=false").get_json()
    assert other["variants"]["premium_upsell"] == "off" and len(evaluations) == 2


def _flag(key, conditions=(), dependencies=None, **extra):
    """A flag in the Flags API's shape: one segment with `conditions` giving `on`, else `off`."""
    segments = [{"conditions": [list(conditions)], "variant": "on"}] if conditions else []
    return {"key": key, "variants": {"on": {"key": "on"}, "off": {"key": "off", "metadata": {"default": True}}},
            "segments": [*segments, {"variant": "off"}], "dependencies": dependencies, **extra}


def test_a_version_the_engine_would_backtrack_on_goes_remote_instead_of_stalling():
    """The engine reads versions with a pattern that takes exponential time on a long, failing
    pre-release: such a request value sends the flag to remote evaluation."""
    from proxy.experiment_local import evaluate, evaluation_context, parse_flags

    config = parse_flags([_flag("new-checkout", [{"selector": ["context", "user", "version"],
                                                  "op": "version greater or equal", "values": ["2.0.0"]}]),
                          _flag("by-pattern", [{"selector": ["context", "user", "user_properties", "email"],
                                                "op": "regex match", "values": ["^(a+)+$"]}])], 0.0)
    good = evaluate(config, evaluation_context("u1", "", {"version": "2.1.0-beta.1"}), ["new-checkout"])
    assert good.vardata == {"new-checkout": {"key": "on"}} and good.remote == []
    hostile = evaluation_context("u1", "", {"version": "1.0.0-" + "a" * 20 + "!",
                                            "user_properties": {"email": "a" * 300 + "!"}})
    decision = evaluate(config, hostile, ["new-checkout", "by-pattern"])
    assert decision.remote == ["new-checkout", "by-pattern"] and decision.vardata == {}


def test_one_malformed_flag_or_a_long_chain_costs_only_that_flag():
    from proxy.experiment_local import FlagStore, evaluate, evaluation_context, parse_flags

    chain = [_flag(f"c{i}", dependencies=[f"c{i + 1}"] if i < 2999 else None) for i in range(3000)]
    broken = {**_flag("broken"), "segments": None}
    with warnings.catch_warnings():  # the library warns about the null segments it is given
        warnings.simplefilter("ignore", RuntimeWarning)
        config = parse_flags([broken, _flag("fine"), *chain, "not a flag"], 0.0)
    assert "broken" not in config.flags and "fine" in config.flags and len(config.flags) == 3001
    assert config.needs["c0"].remote_only is False  # 3,000 levels deep, no RecursionError
    assert evaluate(config, evaluation_context("u1", "", {}), ["fine"]).remote == []

    def lying_fetch():
        raise TypeError("'NoneType' object is not iterable")

    store = FlagStore(lying_fetch, refresh=30, max_age=300)
    assert store.refresh() is False and store.failures == 1
    assert store.state()["last_error"] == "unreadable configuration (TypeError)"
    store.current()  # within the interval after a failure: no new fetch is started
    assert store._thread is None


def test_asked_for_every_flag_a_group_is_used_but_not_answered():
    """Holdouts and mutual exclusion groups decide the flags that depend on them; remote
    evaluation does not return their own result, and neither does local evaluation."""
    from proxy.experiment_local import evaluate, evaluation_context, parse_flags

    group = {**_flag("mutex-1"), "metadata": {"flagType": "mutual-exclusion-group"},
             "segments": [{"variant": "on"}]}
    holdout = {**_flag("holdout-1"), "metadata": {"flagType": "holdout-group"}, "segments": [{"variant": "on"}]}
    experiment = {**_flag("exp-a", [{"selector": ["result", "mutex-1", "key"], "op": "is", "values": ["on"]}],
                          dependencies=["mutex-1", "holdout-1"])}
    config = parse_flags([group, holdout, experiment], 0.0)
    decision = evaluate(config, evaluation_context("u1", "", {}), [])
    assert decision.vardata == {"exp-a": {"key": "on"}} and decision.remote == []
    asked = evaluate(config, evaluation_context("u1", "", {}), ["mutex-1"])  # asked by name: answered
    assert asked.vardata == {"mutex-1": {"key": "on"}}
