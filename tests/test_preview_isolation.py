"""Previews apart from the send path: Liquid previews bounded and rendered in killable render
processes, a per-process cap (503 + Retry-After), bounded message templates on /v1/render/*
(never turned away), and cache hits that keep answering on `ccproxy serve` with two workers
while pathological previews run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from test_serving import SECRETS

from proxy.messages import _previews

NESTED = ("{% for a in (1..1000) %}{% for b in (1..1000) %}{% for c in (1..1000) %}x"
          "{% endfor %}{% endfor %}{% endfor %}")
HUGE_OUTPUT = "{% for a in (1..1000) %}" + "0123456789" * 9000 + "{% endfor %}"  # a 90 KB template
# Loops one after another, each under the iteration limit: only the wall-clock budget stops it.
ENDLESS = "{% for a in (1..40000) %}{% assign b = a | plus: 1 %}{% endfor %}" * 1500


def preview(client, source: str, **attributes):
    return client.post("/v1/preview/liquid", json={"liquid": source, "attributes": attributes})


def assert_liquid_limit(response, starts: str) -> None:
    assert response.status_code == 422, response.get_data(as_text=True)
    body = response.get_json()
    assert body["ok"] is False and body["error"]["code"] == "liquid_limit"
    assert body["error"]["message"].startswith(starts), body["error"]["message"]


def test_pathological_previews_are_422_liquid_limit(client):
    assert_liquid_limit(preview(client, NESTED), "loop_iteration_limit")
    assert_liquid_limit(preview(client, HUGE_OUTPUT), "output_stream_limit")
    r = preview(client, "{% assign s = 'x' %}" + "{% assign s = s | append: s %}" * 40)
    assert_liquid_limit(r, "local_namespace_limit")


def test_an_overrunning_render_is_killed_and_replaced(make_app):
    client = make_app(preview_timeout=2).test_client()
    assert preview(client, "warm {{ 1 | plus: 1 }}").get_json()["output"] == "warm 2"
    pool = _previews_of(client)
    first = pool._idle[0].proc
    r = preview(client, ENDLESS)
    assert_liquid_limit(r, "timeout: the render took longer than 2 s (CCPROXY_PREVIEW_TIMEOUT)")
    assert first.poll() == -signal.SIGKILL  # stopped, not left running
    # The next preview gets a fresh process and the same data path.
    r = preview(client, "{% connected_content /v1/amplitude/recommendations?user_id={{${user_id}}}"
                        "&rec_id=testRecId :save recs %}{{recs.item_1}}", user_id="testUser")
    assert r.status_code == 200 and r.get_json()["output"] == "cookie"
    assert pool.started == 2 and pool._idle[0].proc.pid != first.pid


def test_render_processes_are_niced_and_hold_no_credentials(client):
    assert preview(client, "hi").status_code == 200
    pid = _previews_of(client)._idle[0].proc.pid
    assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"CCPROXY_")]


def test_previews_beyond_the_cap_are_503_but_renders_are_not(make_app):
    app = make_app(preview_concurrency=2)
    client = app.test_client()
    pool = _previews_of(client)
    with pool.slot(), pool.slot():
        for r in (preview(client, "hi"), client.get("/v1/preview/render/recs_block?user_id=testUser")):
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.get_json()["error"]["code"] == "preview_busy"
            assert "CCPROXY_PREVIEW_CONCURRENCY" in r.get_json()["error"]["message"]
        # Braze's send path is never turned away.
        r = client.get("/v1/render/recs_block?user_id=testUser&rec_id=testRecId")
        assert r.status_code == 200 and "cookie" in r.get_data(as_text=True)
    assert preview(client, "hi").status_code == 200


def test_runaway_message_templates_are_422_template_limit(make_app, tmp_path):
    (tmp_path / "catalog.toml").write_text(
        '[loops]\ndescription = "x"\nparams = ["user_id"]\n'
        '[grows]\ndescription = "y"\nparams = ["user_id"]\n'
    )
    (tmp_path / "loops.html").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    (tmp_path / "grows.html").write_text("{% for a in range(900) %}{{ 'x' * 1000 }}{% endfor %}")
    client = make_app(templates_dir=str(tmp_path), render_max_output=100_000).test_client()
    for path, message in (
        ("/v1/render/loops?user_id=u", "loops.html: the template loops more than 10000 times"),
        ("/v1/render/grows?user_id=u", "grows.html: the output would be longer than 100000 characters"),
        ("/v1/preview/render/loops?user_id=u", "loops.html: the template loops more than 10000 times"),
    ):
        r = client.get(path)
        assert r.status_code == 422 and r.get_json()["error"]["code"] == "template_limit"
        assert r.get_json()["error"]["message"].startswith(message)


def _previews_of(client):
    with client.application.app_context():
        return _previews()


# --- `ccproxy serve`, two workers -------------------------------------------------------------

WORKERS, CONCURRENCY = 2, 2
HIT_KEYS = [f"/v1/amplitude/properties?user_id=hit-{i}" for i in range(10)]
PATHOLOGICAL = {"nested": NESTED, "output": HUGE_OUTPUT, "endless-1": ENDLESS, "endless-2": ENDLESS}
EXPECTED = {"nested": "loop_iteration_limit", "output": "output_stream_limit",
            "endless-1": "timeout", "endless-2": "timeout"}


@pytest.fixture
def two_workers(sandboxes, servers):
    env = {**SECRETS, "CCPROXY_LOG_LEVEL": "WARNING", "CCPROXY_PREVIEW_TIMEOUT": "2",
           "CCPROXY_PREVIEW_CONCURRENCY": str(CONCURRENCY)}
    env.update({"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()})
    server = servers.start(["serve", "--workers", str(WORKERS)], env)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {SECRETS['CCPROXY_API_KEYS']}"
    return server.base, session, server.proc


def render_processes(server_pid: int) -> list[int]:
    """Render processes under the server's workers."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    workers = {pid for pid, (ppid, _) in parents.items() if ppid == server_pid}
    return [pid for pid, (ppid, cmd) in parents.items()
            if ppid in workers and b"proxy.preview_worker" in cmd]


def test_cache_hits_answer_while_pathological_previews_run(two_workers, sandboxes):
    base, session, proc = two_workers
    # Warm every key in both workers (their caches are per process): a few rounds each.
    for _ in range(6):
        for key in HIT_KEYS:
            assert session.get(base + key, timeout=30).status_code == 200
    calls_before = sandboxes.state("amplitude").calls

    outcomes: dict[str, list[tuple[int, dict, str]]] = {name: [] for name in PATHOLOGICAL}
    failures: list[str] = []
    stop = threading.Event()
    running = threading.Barrier(len(PATHOLOGICAL) + 1)

    def keep_previewing(name: str, source: str) -> None:
        first, give_up = True, time.monotonic() + 180
        # Until the hits are done, and until this kind of preview has met its limit once.
        while not stop.is_set() or not any(status == 422 for status, _b, _r in outcomes[name]):
            try:
                # A new connection each time: a kept-alive one would stick to one worker.
                r = requests.post(base + "/v1/preview/liquid", json={"liquid": source},
                                  headers=session.headers, timeout=60)
                outcomes[name].append((r.status_code, r.json(), r.headers.get("Retry-After", "")))
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"{name}: {exc!r}")
                return
            if first:
                first = False
                running.wait(60)
            if r.status_code == 503:
                time.sleep(float(r.headers["Retry-After"]))
            if time.monotonic() > give_up:
                return

    threads = [threading.Thread(target=keep_previewing, args=item, daemon=True) for item in PATHOLOGICAL.items()]
    for thread in threads:
        thread.start()
    running.wait(60)  # every kind has been answered once; they keep coming
    hits: Counter = Counter()
    for _ in range(20):
        for key in HIT_KEYS:
            r = session.get(base + key, timeout=30)
            hits[(r.status_code, r.headers.get("X-Cache"))] += 1
    stop.set()
    for thread in threads:
        thread.join(120)

    assert not failures
    assert not any(thread.is_alive() for thread in threads)
    # Every data request answered, from the cache, without an upstream call.
    assert sum(hits.values()) == 20 * len(HIT_KEYS)
    assert set(hits) == {(200, "HIT")}, hits
    assert sandboxes.state("amplitude").calls == calls_before
    # Every preview answered: 422 naming its limit, or 503 preview_busy with Retry-After.
    for name, answers in outcomes.items():
        assert answers, name
        for status, body, retry_after in answers:
            assert body["ok"] is False
            if status == 503:
                assert body["error"]["code"] == "preview_busy" and retry_after == "1"
            else:
                assert status == 422 and body["error"]["code"] == "liquid_limit", (name, status, body)
                assert body["error"]["message"].startswith(EXPECTED[name]), (name, body)
        assert any(status == 422 for status, _b, _r in answers), name
    # The overrunning renders were killed, not left behind: at most one idle process per slot.
    assert len(render_processes(proc.pid)) <= WORKERS * CONCURRENCY
