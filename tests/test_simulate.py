"""`ccproxy simulate-send`: Braze's rules on a fake clock, and short sends against `ccproxy demo`
whose reports must add up and show the faults they were given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from proxy.errors import ScenarioError
from proxy.liquid_preview import Fetched
from proxy.simulate import (
    BrazeCache,
    HostHealth,
    RateSearch,
    Scenario,
    find_rate,
    parse_duration,
    read_faults,
    read_recipients,
    sandboxes_from_log,
    template_liquid,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_host_halts_after_3000_failures_at_over_90_percent_for_one_minute():
    clock = FakeClock()
    health = HostHealth(clock)
    for _ in range(3000):
        health.record(False)
        clock.now += 0.01
    assert not health.halted()  # 3,000 is not more than 3,000
    health.record(False)
    assert health.halted() and len(health.halts) == 1
    clock.now += 59
    assert health.halted()
    clock.now += 1.5
    assert not health.halted()


def test_host_is_not_halted_when_failures_are_under_90_percent_or_old():
    clock = FakeClock()
    health = HostHealth(clock)
    for i in range(4000):  # 3,500 failures, 87.5 %
        health.record(i % 8 == 0)
    assert not health.halted()
    clock.now += 61  # the minute has passed: the window starts again
    for _ in range(3000):
        health.record(False)
    assert not health.halted() and health.halts == []


def test_braze_cache_keeps_an_answer_for_its_max_age():
    clock = FakeClock()
    cache = BrazeCache(clock)
    cache.put("http://p/a?u=1", Fetched(200, {"x": 1}), 300)
    cache.put("http://p/a?u=2", Fetched(200, {"x": 2}), 0)  # :cache_max_age 0 keeps nothing
    assert cache.get("http://p/a?u=1").body == {"x": 1}
    assert cache.get("http://p/a?u=2") is None
    clock.now += 300
    assert cache.get("http://p/a?u=1") is None


def test_fault_schedule_and_inputs_are_read_or_refused_in_one_line(tmp_path: Path):
    faults = tmp_path / "faults.toml"
    faults.write_text('[[fault]]\nat = "2m"\nupstream = "amplitude"\nmode = "ratelimit"\n'
                      'seconds = 60\nduration = "60s"\n[[fault]]\nat = 30\nupstream = "mediarithmics"\n'
                      'mode = "latency"\nseconds = "3s"\n')
    steps = read_faults(faults)
    assert [(s.at, s.upstream, s.mode, s.seconds, s.duration) for s in steps] == [
        (30.0, "mediarithmics", "latency", 3.0, 60.0), (120.0, "amplitude", "ratelimit", 60.0, 60.0)]
    assert parse_duration("500ms") == 0.5
    faults.write_text('[[fault]]\nupstream = "amplitude"\nmode = "explode"\n')
    with pytest.raises(ScenarioError, match="unknown mode 'explode'"):
        read_faults(faults)
    with pytest.raises(ScenarioError, match="not a duration"):
        parse_duration("soon")
    users = tmp_path / "users.csv"
    users.write_text("external_id,email_address\nu1,a@example.com\nu2,b@example.com\n")
    assert [r["user_id"] for r in read_recipients(users, 0)] == ["u1", "u2"]
    users.write_text("name\nx\n")
    with pytest.raises(ScenarioError, match="user_id"):
        read_recipients(users, 0)
    line = '{"msg": "sandbox amplitude upstream listening on http://127.0.0.1:4567"}'
    assert sandboxes_from_log(line) == {"amplitude": "http://127.0.0.1:4567"}


def simulate(tmp_path: Path, demo, *args: str) -> dict:
    """Run `ccproxy simulate-send --json` against the demo (its own process: it patches sockets)."""
    log = tmp_path / "demo.log"
    log.write_text(demo.output())
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "simulate-send", "--url", demo.base, "--demo-log", str(log),
         "--json", *args],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "messages" in done.stderr  # the progress line
    return json.loads(done.stdout)


def assert_consistent(report: dict, recipients: int) -> None:
    messages, calls, writes = report["messages"], report["calls"], report["writes"]
    assert messages["total"] == recipients
    assert messages["complete"] + messages["fallback"] + messages["aborted"] == recipients
    assert sum(report["aborted_reasons"].values()) == messages["aborted"]
    # Every call a tag asked for was answered from Braze's cache, refused by a halt, or sent.
    assert calls["requested"] == calls["braze_cache_hits"] + calls["halted"] + calls["attempts"] - calls["retries"]
    assert sum(calls["statuses"].values()) == calls["attempts"]
    assert calls["per_message"] == round(calls["attempts"] / recipients, 3)
    # Every error answer is counted once by its code; the 429s per upstream add up.
    errors = sum(n for status, n in calls["statuses"].items() if status.isdigit() and int(status) >= 400)
    assert sum(report["errors"].values()) == errors
    assert report["rate_limited"]["upstream_429s"] == {
        name: up["answered_429"] for name, up in report["upstreams"].items()}
    # Writes: each accepted one is delivered, still queued, or dead; none lost track of.
    assert writes["accepted"] == writes["delivered"] + writes["queued"] + writes["dead"]
    assert writes["unknown"] == 0
    assert writes["answered"] == writes["accepted"] + writes["duplicate_answers"]


TEMPLATES = ["--template", "recs_block", "--template", "hero_banner", "--template", "loyalty_badge",
             "--template", "consent_footer"]


def start_demo(servers, tmp_path: Path, **env: str):
    return servers.start(["demo", "--workers", "1"], clean_env=True,
                         env={"CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"), **env})


def write_message(tmp_path: Path, base: str) -> Path:
    """The README's activity write, keyed by dispatch and user: one write per message."""
    path = tmp_path / "write.liquid"
    path.write_text(
        "{% connected_content " + base + "/v1/mediarithmics/activities?idempotency_key="
        "{{campaign.${dispatch_id}}}-{{${user_id} | url_param_escape}} :method post :content_type "
        'application/json :body {"$type":"EMAIL","$ts":1735689600000,"$email_hash":"{{${email_address} '
        '| sha2}}"} :retry :save sent %}\n')
    return path


def test_a_healthy_send_adds_up_and_each_write_reaches_mediarithmics_once(servers, tmp_path):
    demo = start_demo(servers, tmp_path)
    report = simulate(tmp_path, demo, *TEMPLATES, "--liquid", str(write_message(tmp_path, demo.base)),
                      "--recipients", "50", "--rate", "6000")
    assert_consistent(report, 50)
    assert report["messages"]["complete"] == 50
    assert report["scenario"]["connected_content_tags"] == 5
    calls = report["calls"]
    # Four GET tags, three renders: Braze's cache answers the second and third render; the
    # write is posted by every render (Braze never caches a POST).
    assert calls["requested"] == 50 * 3 * 5 and calls["attempts"] == 50 * 4 + 50 * 3
    assert calls["braze_cache_hits"] == 50 * 2 * 4 and calls["failed"] == 0
    # Each upstream sees each recipient once: one miss in the proxy per recipient.
    for name in ("amplitude", "experiment", "target"):
        assert report["upstreams"][name] == {"calls": 50, "per_recipient": 1.0, "answered_429": 0}
    # Writes: three renders post, the idempotency key makes one write each, and each reaches
    # mediarithmics exactly once.
    writes = report["writes"]
    assert writes["attempted"] == 150 and writes["answered"] == 150 and writes["duplicate_answers"] == 100
    assert writes["accepted"] == 50 == writes["delivered"] + writes["queued"]
    assert writes["delivered"] == 50 and writes["dead"] == 0  # the send waited for delivery
    assert writes["mediarithmics_received"] == 50 and writes["mediarithmics_duplicated"] == 0
    assert writes["exactly_once"] is True and writes["accepted_after_braze_gave_up"] == 0
    assert report["upstreams"]["mediarithmics"]["calls"] == 50 + 50  # the choices, the writes
    assert report["host_halted"] == []
    assert report["simulator"]["cpu_s"] > 0 and report["simulator"]["cpu_ms_per_message"] > 0


def amplitude_fault(tmp_path: Path, demo, mode: str, recipients: int, retry: bool = False) -> dict:
    """The four templates sent while Amplitude has `mode` (Retry-After 60 s) all the time;
    `retry`: their data tags with `:retry`, as the snippets had them before."""
    faults = tmp_path / "faults.toml"
    faults.write_text(f'[[fault]]\nat = 0\nupstream = "amplitude"\nmode = "{mode}"\n'
                      'seconds = 60\nduration = "10m"\n')
    message = list(TEMPLATES)
    if retry:
        liquid = tmp_path / "retry.liquid"
        liquid.write_text(template_liquid([TEMPLATES[i] for i in range(1, len(TEMPLATES), 2)], demo.base, "")
                          .replace(" :cache_max_age", " :retry :cache_max_age"))
        message = ["--liquid", str(liquid)]
    return simulate(tmp_path, demo, *message, "--recipients", str(recipients), "--rate", "6000",
                    "--faults", str(faults))


def test_an_amplitude_429_storm_is_counted_on_both_sides_and_recommendations_fall_back(servers, tmp_path):
    demo = start_demo(servers, tmp_path)
    report = amplitude_fault(tmp_path, demo, "ratelimit", 40)
    assert_consistent(report, 40)
    # The upstream answered 429 (then the proxy held off for its Retry-After); Braze saw no
    # error, only recommendations' "none for now", and every message went out.
    assert report["upstreams"]["amplitude"]["answered_429"] >= 1
    assert report["upstreams"]["amplitude"]["answered_429"] == report["upstreams"]["amplitude"]["calls"]
    assert report["rate_limited"]["braze_saw_upstream_rate_limited"] == 0
    assert report["rate_limited"]["braze_saw_fallback_answers"] == 40
    assert report["messages"] == {"total": 40, "complete": 0, "fallback": 40, "aborted": 0,
                                  "sent_after_failed_call": 0}
    assert report["faults"][0]["action"] == "start" and "amplitude ratelimit" in report["faults"][0]["fault"]


def test_the_same_storm_with_the_old_503_aborts_and_braze_sees_the_rate_limit(servers, tmp_path):
    demo = start_demo(servers, tmp_path, CCPROXY_RECOMMENDATIONS_RATE_LIMIT_FALLBACK="false")
    report = amplitude_fault(tmp_path, demo, "ratelimit", 20, retry=True)
    assert_consistent(report, 20)
    assert report["messages"]["aborted"] == 20
    # :retry: six attempts per message, every one a 503 upstream_rate_limited.
    assert report["rate_limited"]["braze_saw_upstream_rate_limited"] == 20 * 6
    assert report["errors"] == {"503 upstream_rate_limited": 20 * 6}
    assert report["upstreams"]["amplitude"]["answered_429"] >= 1


def test_a_fault_schedule_shows_in_the_report(servers, tmp_path):
    demo = start_demo(servers, tmp_path)
    report = amplitude_fault(tmp_path, demo, "error", 50, retry=True)
    assert_consistent(report, 50)
    # Amplitude answers 500 (not a rate limit): the proxy answers 503, the recs tag carries
    # :retry, so Braze retries five times and aborts.
    assert report["messages"]["aborted"] == 50
    assert report["aborted_reasons"] == {"HTTP 503 after :retry": 50}
    assert report["calls"]["retries"] == 50 * 5
    assert report["faults"][0]["action"] == "start" and "amplitude error" in report["faults"][0]["fault"]
    assert report["faults"][-1]["action"].startswith("end")
    # The proxy's circuit breaker held off Amplitude instead of passing on 300 calls.
    assert report["upstreams"]["amplitude"]["calls"] < 50
    assert report["upstreams"]["amplitude"]["answered_429"] == 0


def test_the_shipped_snippets_send_every_message_while_amplitude_fails(servers, tmp_path):
    """The data tags have no :retry: Amplitude failing (500s, then an open circuit) costs the
    recommendations, never the message."""
    demo = start_demo(servers, tmp_path)
    report = amplitude_fault(tmp_path, demo, "error", 20)
    assert_consistent(report, 20)
    assert report["messages"]["aborted"] == 0 and report["calls"]["retries"] == 0
    assert report["messages"]["fallback"] == report["messages"]["sent_after_failed_call"] == 20


def test_without_retry_a_failed_call_sends_the_message_on_the_error_and_no_fault_is_left_behind(servers, tmp_path):
    demo = start_demo(servers, tmp_path)
    message = tmp_path / "message.liquid"
    message.write_text(
        "{% connected_content " + demo.base + "/v1/experiment/variants?user_id={{${user_id}}}"
        "&flag_keys=hero-banner :no_cache :save exp %}{{exp.variants.hero_banner}}\n")
    faults = tmp_path / "faults.toml"
    faults.write_text('[[fault]]\nat = 0\nupstream = "experiment"\nmode = "error"\nduration = "10m"\n')
    report = simulate(tmp_path, demo, "--liquid", str(message), "--recipients", "20", "--rate", "6000",
                      "--renders", "2", "--faults", str(faults))
    assert_consistent(report, 20)
    assert report["calls"]["braze_cache_hits"] == 0  # :no_cache
    assert report["calls"]["retries"] == 0  # no :retry
    # Every call fails (503); without :retry Braze sends each message built on the error
    # answer: fallback, never aborted, never complete.
    assert report["calls"]["failed"] == 20 * 2
    assert report["messages"] == {"total": 20, "complete": 0, "fallback": 20, "aborted": 0,
                                  "sent_after_failed_call": 20}
    assert report["aborted_reasons"] == {}
    # The run lifted its fault when it ended: the sandbox answers without the injected 500.
    experiment = sandboxes_from_log(demo.output())["experiment"]
    assert requests.get(f"{experiment}/no-such-path", timeout=10).status_code != 500


def test_a_bad_scenario_is_one_line_and_exit_status_1(tmp_path):
    faults = tmp_path / "faults.toml"
    faults.write_text('[[fault]]\nupstream = "amplitude"\nmode = "explode"\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "simulate-send", "--template", "recs_block", "--faults", str(faults)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"ccproxy: {faults} fault 1: unknown mode 'explode' (one of latency, none, slow, hang, error, "
        "ratelimit, reset, malformed, oversized, unavailable, deep, trickle_headers, slow_body, trickle, "
        "refuse, applied_not_json, out_of_range, lone_surrogate, forbidden)"]
    assert "Traceback" not in done.stderr


def test_exactly_once_is_judged_on_what_mediarithmics_received():
    from collections import Counter

    from proxy.simulate import _delivery

    def sandbox(received: int, duplicated: int) -> dict:
        return {"mediarithmics": {"counters": {"writes_received": received, "writes_duplicated": duplicated}}}

    before = sandbox(10, 1)
    once = _delivery(Counter(delivered=5, queued=2), 1.0, before, sandbox(15, 1))
    assert once["exactly_once"] is True and once["queued"] == 2 and once["accepted_after_braze_gave_up"] == 0
    # Two more arrived than Braze knew of (their 202 came too late): still once each.
    late = _delivery(Counter(delivered=5), 1.0, before, sandbox(17, 1))
    assert late["exactly_once"] is True and late["accepted_after_braze_gave_up"] == 2
    twice = _delivery(Counter(delivered=5), 1.0, before, sandbox(16, 2))
    assert twice["exactly_once"] is False and twice["mediarithmics_duplicated"] == 1
    lost = _delivery(Counter(delivered=5), 1.0, before, sandbox(14, 1))
    assert lost["exactly_once"] is False


def fake_probe(limit: float):
    """A stand-in for one probe: safe up to `limit` messages a minute; records the rates asked."""
    asked: list[float] = []

    def runner(scenario: Scenario) -> dict:
        asked.append(scenario.rate)
        aborted = 0 if scenario.rate <= limit else len(scenario.recipients)
        n = len(scenario.recipients)
        assert len({r["user_id"] for r in scenario.recipients}) == n  # fresh ids in each probe
        return {"messages": {"total": n, "complete": n - aborted, "fallback": 0, "aborted": aborted},
                "host_halted": [], "latency_ms": {"p99": 1.0},
                "simulator": {"limited": False}}

    return runner, asked


def test_find_rate_doubles_then_bisects_within_its_bounds():
    scenario = Scenario(url="http://proxy", liquid="", recipients=[{"user_id": "x"}], rate=600)
    runner, asked = fake_probe(limit=3000)
    result = find_rate(scenario, RateSearch(probe_seconds=6, max_rate=100_000), progress=None, runner=runner)
    search = result["find_rate"]
    assert asked[:4] == [600, 1200, 2400, 4800]  # doubling until the first unsafe probe
    assert 2400 <= search["safe_rate_per_minute"] <= 3000 < search["lowest_unsafe_rate_per_minute"]
    assert search["lowest_unsafe_rate_per_minute"] <= search["safe_rate_per_minute"] * 1.1
    assert [p["rate_per_minute"] for p in search["probes"]] == asked
    assert all(p["safe"] == (p["rate_per_minute"] <= 3000) for p in search["probes"])
    assert search["recipients_used"] == sum(p["recipients"] for p in search["probes"])
    # Halving when the first rate is unsafe; none safe down to the floor says so.
    runner, asked = fake_probe(limit=0)
    none = find_rate(scenario, RateSearch(probe_seconds=6), progress=None, runner=runner)["find_rate"]
    assert none["safe_rate_per_minute"] is None and asked == [600, 300, 150, 75]
    assert "unsafe down to" in none["stopped"]
    # The recipient bound stops the search.
    runner, asked = fake_probe(limit=10**9)
    bounded = find_rate(scenario, RateSearch(probe_seconds=60, max_recipients=5000), progress=None,
                        runner=runner)["find_rate"]
    assert bounded["recipients_used"] <= 5000 and "recipient bound" in bounded["stopped"]
    assert bounded["safe_rate_per_minute"] == asked[-1]
    with pytest.raises(ScenarioError, match="fewer than the first probe needs"):
        find_rate(scenario, RateSearch(probe_seconds=60, max_recipients=100), progress=None, runner=runner)


def test_find_rate_against_the_demo_reports_a_rate_and_its_probes(servers, tmp_path):
    demo = start_demo(servers, tmp_path)
    report = simulate(tmp_path, demo, "--template", "hero_banner", "--rate", "600", "--find-rate",
                      "--probe-seconds", "2", "--max-rate", "2400", "--find-rate-budget", "120")
    search = report["find_rate"]
    rates = [p["rate_per_minute"] for p in search["probes"]]
    assert rates[0] == 600 and len(rates) >= 1
    assert all(p["recipients"] >= 10 for p in search["probes"])
    safe = [p["rate_per_minute"] for p in search["probes"] if p["safe"]]
    assert search["safe_rate_per_minute"] == (max(safe) if safe else None)
    assert isinstance(search["safe_rate_per_minute"], float | int) or search["stopped"]
    # The report is the highest safe probe's, consistent like any other.
    assert_consistent(report, report["messages"]["total"])


def test_a_send_with_no_proxy_to_send_to_is_one_line_and_status_1(tmp_path):
    missing = tmp_path / "nosuch.log"
    for extra, said in ((["--url", "http://127.0.0.1:1"], "ccproxy: no proxy at http://127.0.0.1:1: it cannot"),
                        (["--demo-log", str(missing)], f"ccproxy: cannot read {missing}: No such file")):
        done = subprocess.run([sys.executable, "-m", "proxy.cli", "simulate-send", "--template", "recs_block",
                               "--recipients", "3", *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(said), done.stderr
