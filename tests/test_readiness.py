"""Truthful health (issue 11, point 6): /readyz is 503 only when this process cannot answer
cached data; anything degraded is 200 with reasons (503 with ?strict=true); never a 500.
Upstream answers too deep, too large or not JSON are 503 upstream_bad_answer, never a 500."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import pytest
import requests
from ccproxy_serve import serving
from conftest import upstream_calls
from servers import wait_for

from proxy import readiness

PROPS = "/v1/amplitude/properties?user_id="


def test_healthy_readyz_keeps_its_fields_and_adds_reasons(client):
    r = client.get("/readyz")
    ready = r.get_json()
    assert r.status_code == 200 and ready["ok"] is True and ready["ready"] is True
    assert ready["degraded"] is False and ready["reasons"] == []
    assert set(ready) >= {"ok", "degraded", "cache", "upstreams", "outbox", "reasons", "ready", "worker"}
    assert ready["outbox"]["usable"] is True and ready["outbox"]["writable"] is True
    # Every state counted, 0 included: a dashboard or a script reads `dead` whatever happened.
    assert {state: ready["outbox"][state] for state in ("queued", "failed", "delivered", "dead")} == {
        "queued": 0, "failed": 0, "delivered": 0, "dead": 0}
    assert client.get("/readyz?strict=true").status_code == 200


def test_open_breaker_is_degraded_not_down_unless_strict(make_app, sandboxes):
    client = make_app(breaker_threshold=1, cache_max_stale=0).test_client()
    sandboxes.state("experiment").set_fault("error", count=1)
    client.get("/v1/experiment/variants?user_id=u&flag_keys=hero-banner")
    r = client.get("/readyz")
    assert r.status_code == 200 and r.get_json()["degraded"] is True
    assert r.get_json()["reasons"] == [{"code": "breaker_open", "component": "upstream:experiment",
                                        "message": "experiment's circuit breaker is open"}]
    strict = client.get("/readyz?strict=true")
    assert strict.status_code == 503 and strict.get_json()["ok"] is False
    assert strict.get_json()["error"]["code"] == "degraded"
    assert client.get("/readyz?strict=maybe").get_json()["error"]["code"] == "invalid_parameter"


def test_unopenable_outbox_is_degraded(make_app, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = make_app(outbox_path=str(blocker / "outbox.sqlite3")).test_client().get("/readyz")
    assert r.status_code == 200
    assert [reason["code"] for reason in r.get_json()["reasons"]] == ["outbox_unavailable"]
    assert r.get_json()["outbox"] == {"usable": False, "writable": False}


def test_a_failing_check_is_a_reason_never_a_500(client, monkeypatch):
    def broken(services, report):
        raise RuntimeError("boom")

    monkeypatch.setattr(readiness, "CHECKS", [*readiness.CHECKS, broken])
    r = client.get("/readyz")
    assert r.status_code == 200 and r.get_json()["reasons"][-1]["code"] == "check_failed"
    def check_cache(services, report):
        raise RuntimeError("boom")

    monkeypatch.setattr(readiness, "CHECKS", [check_cache])
    r = client.get("/readyz")  # the cache check itself failing: this process cannot answer
    assert r.status_code == 503 and r.get_json()["ready"] is False
    assert r.get_json()["error"]["code"] == "not_ready"


@pytest.mark.parametrize("upstream, path", [
    ("amplitude", PROPS + "deep-1"),
    ("experiment", "/v1/experiment/variants?flag_keys=hero-banner&user_id=deep-1"),
    ("target", "/v1/adobe-target/profile?third_party_id=deep-1"),
    ("mediarithmics", "/v1/mediarithmics/profile?user_point_id=deep-1"),
])
@pytest.mark.parametrize("fault", ["deep", "malformed", "oversized", "out_of_range", "lone_surrogate"])
def test_unusable_answers_are_503_bad_answer(make_app, sandboxes, upstream, path, fault):
    client = make_app(cache_max_stale=0).test_client()
    sandboxes.state(upstream).set_fault(fault)
    r = client.get(path)
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "upstream_bad_answer"
    assert int(r.headers["Retry-After"]) >= 1


def test_deep_answer_serves_stale_when_it_can(make_app, sandboxes, clock):
    client = make_app(cache_grace=0, cache_max_stale=600).test_client()
    good = client.get(PROPS + "deep-stale").get_json()
    clock.advance(400)
    sandboxes.state("amplitude").set_fault("deep")
    r = client.get(PROPS + "deep-stale")
    assert r.status_code == 200 and r.headers["X-Cache"] == "STALE"
    assert r.get_json()["properties"] == good["properties"]
    assert upstream_calls(sandboxes) == 2


def test_deep_answer_through_render_and_preview_is_no_500(make_app, sandboxes):
    client = make_app(cache_max_stale=0).test_client()
    sandboxes.state("amplitude").set_fault("deep")
    assert client.get("/v1/render/recs_block?user_id=deep-render").status_code == 200  # its fallback
    liquid = "{% connected_content /v1/amplitude/properties?user_id=deep-p :save p %}[{{p.ok}}]"
    r = client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": {}})
    assert r.status_code == 200 and r.get_json()["calls"][0]["status"] == 503


@pytest.fixture
def served_on_small_tmpfs(sandboxes, tmp_path):
    """`ccproxy serve` (two workers) in its own mount namespace, its outbox on a 2 MB tmpfs
    that this test fills and remounts read-only (as root, file modes prove nothing)."""
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.fail("unshare/nsenter (util-linux) are needed for this test")
    mount_dir = tmp_path / "outbox-fs"
    mount_dir.mkdir()
    env = {"CCPROXY_OUTBOX_PATH": str(mount_dir / "outbox.sqlite3"), "CCPROXY_OUTBOX_MIN_FREE_MB": "0.25"}

    def in_namespace(command):
        serve = " ".join(command)
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o size=2m tmpfs {mount_dir} && exec {serve}"]

    with serving(sandboxes, tmp_path / "serve.log", env, wrap=in_namespace) as (base, proc):
        yield base, proc, mount_dir


def _outbox_reasons(base: str) -> tuple[int, list[dict]]:
    r = requests.get(base + "/readyz", timeout=10)
    return r.status_code, [reason for reason in r.json()["reasons"] if reason["component"] == "outbox"]


def test_full_or_read_only_outbox_is_reported(served_on_small_tmpfs):
    base, proc, mount_dir = served_on_small_tmpfs
    seen_from_outside = f"/proc/{proc.pid}/root{mount_dir}"  # the server's mount namespace
    assert _outbox_reasons(base) == (200, [])
    assert os.path.exists(seen_from_outside + "/outbox.sqlite3")

    with open(seen_from_outside + "/fill", "wb") as fill:  # the disk fills up
        try:
            while True:
                fill.write(b"\0" * 65536)
                fill.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # Each worker reuses its check for a second: wait for the state, then whichever answers.
    wait_for(lambda: _outbox_reasons(base)[1], seconds=30, what="the full disk reported")
    time.sleep(1.1)
    for _ in range(3):  # whichever worker answers
        status, reasons = _outbox_reasons(base)
        assert status == 200 and [r["code"] for r in reasons] == ["outbox_unwritable"]
        assert "KB free" in reasons[0]["message"]
    strict = requests.get(base + "/readyz?strict=true", timeout=10)
    assert strict.status_code == 503 and strict.json()["error"]["code"] == "degraded"
    # Cached data still answers while the outbox is unwritable.
    assert requests.get(base + PROPS + "testUser", timeout=10).status_code == 200

    os.remove(seen_from_outside + "/fill")
    wait_for(lambda: _outbox_reasons(base) == (200, []), seconds=30, what="the outbox healthy again")
    time.sleep(1.1)
    assert _outbox_reasons(base) == (200, [])
    remount = ["nsenter", "-t", str(proc.pid), "-m", "mount", "-o", "remount,ro", str(mount_dir)]
    for _ in range(300):  # "busy" while a delivery poll has the database open for a moment
        if subprocess.run(remount, capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the outbox file system could not be made read-only")
    time.sleep(1.1)  # past every worker's reused check
    for _ in range(3):
        status, reasons = _outbox_reasons(base)
        assert status == 200 and [r["code"] for r in reasons] == ["outbox_unwritable"]
        assert "read-only" in reasons[0]["message"]
