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
    parse_duration,
    read_faults,
    read_recipients,
    sandboxes_from_log,
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
    messages, calls = report["messages"], report["calls"]
    assert messages["total"] == recipients
    assert messages["complete"] + messages["fallback"] + messages["aborted"] == recipients
    assert sum(report["aborted_reasons"].values()) == messages["aborted"]
    # Every call a tag asked for was answered from Braze's cache, refused by a halt, or sent.
    assert calls["requested"] == calls["braze_cache_hits"] + calls["halted"] + calls["attempts"] - calls["retries"]
    assert sum(calls["statuses"].values()) == calls["attempts"]
    assert calls["per_message"] == round(calls["attempts"] / recipients, 3)


TEMPLATES = ["--template", "recs_block", "--template", "hero_banner", "--template", "loyalty_badge",
             "--template", "consent_footer"]


def test_a_healthy_send_adds_up_and_braze_caches_the_renders(servers, tmp_path):
    demo = servers.start(["demo", "--workers", "1"], clean_env=True)
    report = simulate(tmp_path, demo, *TEMPLATES, "--recipients", "50", "--rate", "6000")
    assert_consistent(report, 50)
    assert report["messages"]["complete"] == 50
    assert report["scenario"]["connected_content_tags"] == 4
    calls = report["calls"]
    # Four tags, three renders: Braze's cache answers the second and third render.
    assert calls["requested"] == 50 * 3 * 4 and calls["attempts"] == 50 * 4
    assert calls["braze_cache_hits"] == 50 * 2 * 4 and calls["failed"] == 0
    # Each upstream sees each recipient once: one miss in the proxy per recipient.
    for name in ("amplitude", "experiment", "target", "mediarithmics"):
        assert report["upstreams"][name] == {"calls": 50, "per_recipient": 1.0}
    assert report["host_halted"] == []
    assert report["simulator"]["cpu_s"] > 0


def test_a_fault_schedule_shows_in_the_report(servers, tmp_path):
    demo = servers.start(["demo", "--workers", "1"], clean_env=True)
    faults = tmp_path / "faults.toml"
    faults.write_text('[[fault]]\nat = 0\nupstream = "amplitude"\nmode = "unavailable"\n'
                      'seconds = 30\nduration = "10m"\n')
    report = simulate(tmp_path, demo, *TEMPLATES, "--recipients", "50", "--rate", "6000",
                      "--faults", str(faults))
    assert_consistent(report, 50)
    # Amplitude answers 503: the recs tag carries :retry, so Braze retries five times and aborts.
    assert report["messages"]["aborted"] == 50
    assert report["aborted_reasons"] == {"HTTP 503 after :retry": 50}
    assert report["calls"]["retries"] == 50 * 5
    assert report["faults"][0]["action"] == "start" and "amplitude unavailable" in report["faults"][0]["fault"]
    assert report["faults"][-1]["action"].startswith("end")
    # The proxy held off Amplitude after its Retry-After instead of passing on 300 calls.
    assert report["upstreams"]["amplitude"]["calls"] < 50


def test_a_liquid_message_without_retry_counts_a_failed_call_and_sends_no_fault_left_behind(servers, tmp_path):
    demo = servers.start(["demo", "--workers", "1"], clean_env=True)
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
    assert report["messages"]["complete"] + report["messages"]["fallback"] + report["messages"]["aborted"] == 20
    assert report["messages"]["complete"] < 20
    assert set(report["aborted_reasons"]) <= {"HTTP 500", "HTTP 502", "HTTP 503"}
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
        "ratelimit, reset, malformed, oversized, unavailable, deep, trickle_headers, slow_body, trickle)"]
    assert "Traceback" not in done.stderr
