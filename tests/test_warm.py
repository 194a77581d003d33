"""`ccproxy warm` against a live proxy over loopback."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import upstream_calls

from proxy import config, create_app
from proxy.sandbox.server import RunningServer
from proxy.warm import progress_line, read_rows, state_path, warm


@pytest.fixture
def live(sandboxes):
    settings = config.load(overrides=sandboxes.proxy_settings(), environ={})
    app = create_app(settings)
    server = RunningServer(app).start()
    yield server.url, app
    server.stop()


def write_users(tmp_path, ids):
    path = tmp_path / "users.csv"
    path.write_text("user_id\n" + "\n".join(ids) + "\n")
    return path


def test_warms_the_cache_and_summarises(live, sandboxes, tmp_path):
    url, app = live
    users = write_users(tmp_path, [f"w{i}" for i in range(12)] + ["unknown-w1", "unknown-w2"])
    out = io.StringIO()
    summary = warm(url, "recommendations", users, {"rec_id": "testRecId"}, per_minute=60_000, out=out)
    assert (summary.fetched, summary.not_found, summary.failed) == (12, 2, 0)
    assert "14/14" in out.getvalue() and "ETA" in out.getvalue()
    assert upstream_calls(sandboxes) == 14
    client = app.test_client()
    assert client.get("/v1/amplitude/recommendations?user_id=w3&rec_id=testRecId").headers["X-Cache"] == "HIT"
    assert not state_path(users, "recommendations").exists()


def test_resumes_after_interruption(live, sandboxes, tmp_path):
    url, _app = live
    users = write_users(tmp_path, [f"r{i}" for i in range(10)])
    state_path(users, "properties").write_text("6")
    summary = warm(url, "properties", users, {}, per_minute=60_000, out=io.StringIO())
    assert summary.skipped == 6 and summary.done == 4 and upstream_calls(sandboxes) == 4


def test_paced_at_the_rate(live, sandboxes, tmp_path):
    import time

    url, _app = live
    users = write_users(tmp_path, [f"p{i}" for i in range(5)])
    started = time.monotonic()
    warm(url, "cohorts", users, {}, per_minute=600, out=io.StringIO())  # one call per 100 ms
    assert time.monotonic() - started >= 0.35


def test_failures_are_counted(live, sandboxes, tmp_path):
    url, _app = live
    sandboxes.state("amplitude").set_fault("error")
    users = write_users(tmp_path, ["f1", "f2"])
    summary = warm(url, "recommendations", users, {"rec_id": "x"}, per_minute=60_000, out=io.StringIO())
    assert summary.failed == 2 and summary.errors == {"HTTP 503 upstream_unavailable": 2}


def test_rate_limited_fallbacks_are_not_counted_as_warmed(live, sandboxes, tmp_path):
    url, app = live
    sandboxes.state("amplitude").set_fault("ratelimit", 30)  # a 429 storm (and the pause it starts)
    users = write_users(tmp_path, ["l1", "l2", "l3"])
    summary = warm(url, "recommendations", users, {"rec_id": "x"}, per_minute=60_000, out=io.StringIO())
    assert summary.fetched == 0 and summary.failed == 3 and summary.errors == {"fallback": 3}
    assert app.test_client().get("/v1/amplitude/recommendations?user_id=l1&rec_id=x").headers["X-Cache"] != "HIT"


def test_read_rows_forms(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a\nb\n\n")
    assert read_rows(plain) == [{"user_id": "a"}, {"user_id": "b"}]
    multi = tmp_path / "multi.csv"
    multi.write_text("email_hash,name\nh1,Ann\n")
    assert read_rows(multi) == [{"email_hash": "h1"}]


def test_progress_line():
    assert progress_line(50, 100, 0.0, 10.0, width=10) == "[#####.....] 50/100  50%   5.0/s ETA 0m10s"


def test_cli_warm(live, tmp_path):
    url, _app = live
    users = write_users(tmp_path, ["c1", "c2", "unknown-c3"])
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "warm", "--endpoint", "recommendations", "--rec-id", "testRecId",
         "--users", str(users), "--url", url, "--rate", "60000"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "done: 2 fetched, 1 not found, 0 failed" in done.stderr


def test_cli_warm_param_that_is_not_name_value_is_a_usage_error(tmp_path):
    users = write_users(tmp_path, ["c1"])
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "warm", "--endpoint", "recommendations", "--users", str(users),
         "--param", "foo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --param: expected NAME=VALUE, got 'foo'" in done.stderr


def test_a_call_the_proxy_refuses_stops_warm_at_the_first_row_with_its_reason(live, sandboxes, tmp_path):
    url, _app = live
    users = write_users(tmp_path, [f"r{i}" for i in range(50)])
    before = sandboxes.state("amplitude").calls
    done = subprocess.run(  # no --rec-id: every recommendations call would be a 400
        [sys.executable, "-m", "proxy.cli", "warm", "--endpoint", "recommendations", "--users", str(users),
         "--url", url, "--rate", "60000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the first call failed, so nothing else was sent: HTTP 400 missing_parameter" in done.stderr
    assert sandboxes.state("amplitude").calls == before


def test_each_row_is_asked_once_and_a_rows_own_bad_id_fails_only_that_row(live, tmp_path):
    url, app = live
    cache = app.extensions["ccproxy"].cache
    before = sum(cache.counts.values())
    users = write_users(tmp_path, ["once-1", "once-2", "once-3"])
    summary = warm(url, "cohorts", users, {}, per_minute=60_000, out=io.StringIO())
    assert summary.done == 3 and sum(cache.counts.values()) - before == 3  # the first row too: once
    # A first row whose own id is too long is that row's failure, not a reason to stop.
    users = write_users(tmp_path, ["x" * 300, "once-4"])
    summary = warm(url, "cohorts", users, {}, per_minute=60_000, out=io.StringIO())
    assert summary.failed == 1 and summary.errors == {"HTTP 400 invalid_parameter": 1} and summary.done == 2
