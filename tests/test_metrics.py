"""/metrics in Braze's terms, and correct across `ccproxy serve`'s workers."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import requests
from servers import wait_for

KEY = "metrics-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent); labels must all match."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def series_labels(text: str, name: str, label: str) -> set[str]:
    return {m for m in re.findall(name + r'\{[^}]*' + label + r'="([^"]*)"', text)}


def proxy_env(sandboxes, tmp_path: Path) -> dict[str, str]:
    env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
    env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_LOG_LEVEL": "WARNING",
                "CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
                "CCPROXY_METRICS_DIR": str(tmp_path / "metrics")})
    return env


def test_a_scrape_sums_every_worker(servers, sandboxes, tmp_path):
    served = servers.start(["serve", "--workers", "2"], proxy_env(sandboxes, tmp_path))
    # Fresh connections (no session) spread requests over both workers; /readyz says whose.
    answered: dict[int, int] = {}

    def both_answered() -> bool:
        worker = requests.get(served.base + "/readyz", timeout=10).json()["worker"]
        answered[worker] = answered.get(worker, 0) + 1
        return len(answered) == 2

    wait_for(both_answered, seconds=60, what="both workers answering /readyz")
    for n in range(20):
        assert requests.get(served.base + RECS + f"u{n % 5}", headers=AUTH, timeout=10).status_code == 200
    readyz_total = sum(answered.values())
    workers = {str(pid) for pid in answered}
    def scrape() -> str:
        return requests.get(served.base + "/metrics", headers=AUTH, timeout=10).text

    # A request is counted once its answer is written: the last one may land just after its client read it.
    wait_for(lambda: sample(scrape(), "ccproxy_requests_total", route="/v1/amplitude/recommendations",
                            status="200") == 20, seconds=30, what="the last request counted")
    for _ in range(6):  # whichever worker answers the scrape, it counts for both
        text = scrape()
        assert sample(text, "ccproxy_requests_total", route="/readyz") == readyz_total
        assert sample(text, "ccproxy_requests_total", route="/v1/amplitude/recommendations",
                      status="200") == 20
        assert sample(text, "ccproxy_cache_lookups_total") >= 5  # at least the five misses
    # Each worker copies its own state (breakers here) into the shared files once a second.
    wait_for(lambda: workers <= series_labels(
        requests.get(served.base + "/metrics", headers=AUTH, timeout=10).text, "ccproxy_breaker_open", "worker"),
        seconds=30, what="both workers' breaker states in one scrape")

    # Each worker writes files of its own (named by its process id, which each worker caches).
    names = {path.name for path in (tmp_path / "metrics").glob("*.db")}
    assert {f"counter_{pid}.db" for pid in workers} <= names, names

    # A worker that dies leaves its counts but not its live gauges (gunicorn starts another).
    dead = next(iter(answered))
    os.kill(dead, signal.SIGKILL)

    def gone() -> str | None:
        text = requests.get(served.base + "/metrics", headers=AUTH, timeout=10).text
        return text if str(dead) not in series_labels(text, "ccproxy_breaker_open", "worker") else None

    text = wait_for(gone, seconds=60, what="the dead worker's gauges to go")
    assert sample(text, "ccproxy_requests_total", route="/v1/amplitude/recommendations", status="200") == 20

    metrics_dir = tmp_path / "metrics"
    assert list(metrics_dir.glob("*.db")), "the workers keep their values in the directory named"
    assert served.terminate() == 0
    assert not list(metrics_dir.glob("*.db")), "a clean stop leaves no metric files behind"


def test_default_metrics_dir_is_made_and_removed(servers, sandboxes, tmp_path):
    env = proxy_env(sandboxes, tmp_path)
    del env["CCPROXY_METRICS_DIR"]
    env["TMPDIR"] = str(tmp_path)
    before = set(Path("/dev/shm").glob("ccproxy-metrics-*")) | set(tmp_path.glob("ccproxy-metrics-*"))
    served = servers.start(["serve", "--workers", "2"], env)
    assert requests.get(served.base + RECS + "d1", headers=AUTH, timeout=10).status_code == 200
    made = (set(Path("/dev/shm").glob("ccproxy-metrics-*")) | set(tmp_path.glob("ccproxy-metrics-*"))) - before
    # Other servers on the machine may make theirs meanwhile: ours is the one its master names.
    environ = Path(f"/proc/{served.pid}/environ").read_bytes().split(b"\0")
    named = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    ours = Path(named[0]) if named else None
    if ours is None:  # set after start-up in the master's own os.environ, not its initial environ
        assert len(made) >= 1
        ours = next(d for d in made if list(d.glob("*.db")))
    assert ours in made and list(ours.glob("*.db"))
    assert served.terminate() == 0
    assert not ours.exists()


def test_braze_failures_stale_and_pauses_by_route(make_app, sandboxes, clock):
    client = make_app(cache_ttl_recommendations=10, cache_max_stale=600, cache_grace=0).test_client()
    amplitude = sandboxes.state("amplitude")
    assert client.get(RECS + "b1").status_code == 200
    clock.advance(60)  # past its TTL: the next failure is answered stale
    amplitude.set_fault("error", count=10)
    stale = client.get(RECS + "b1")
    assert stale.status_code == 200 and stale.headers["X-Cache"] == "STALE"
    failed = client.get(RECS + "b2")
    assert failed.status_code == 503
    assert client.get(RECS + "b3&rec_type=bad").status_code == 400  # renders empty in Braze: no failure
    assert client.get("/v1/nope").status_code == 404
    text = client.get("/metrics").get_data(as_text=True)
    route = "/v1/amplitude/recommendations"
    assert sample(text, "ccproxy_braze_failures_total", route=route, reason="5xx") == 1
    assert sample(text, "ccproxy_braze_failures_total") == 1  # not the 400, the 404 or the scrape
    assert sample(text, "ccproxy_degraded_answers_total", route=route, kind="stale") == 1
    assert sample(text, "ccproxy_degraded_answers_total", kind="fallback") == 0


def test_upstream_429_pauses_are_counted(make_app, sandboxes):
    client = make_app().test_client()
    sandboxes.state("amplitude").set_fault("ratelimit", count=1)
    assert client.get(RECS + "p1").status_code == 200  # recommendations: "none for now"
    assert client.get("/v1/amplitude/properties?user_id=p2").status_code == 503  # paused
    text = client.get("/metrics").get_data(as_text=True)
    assert sample(text, "ccproxy_upstream_calls_total", upstream="amplitude", outcome="429") == 1
    assert sample(text, "ccproxy_upstream_pauses_total", upstream="amplitude") == 1
    assert sample(text, "ccproxy_upstream_paused", upstream="amplitude") == 1
    assert sample(text, "ccproxy_braze_failures_total", route="/v1/amplitude/recommendations") == 0
    assert sample(text, "ccproxy_degraded_answers_total", route="/v1/amplitude/recommendations",
                  kind="fallback") == 1
    assert sample(text, "ccproxy_braze_failures_total", route="/v1/amplitude/properties") == 1


def test_braze_failure_reasons():
    from proxy.observability import braze_failure

    assert [braze_failure(s, 0.1) for s in (200, 404, 400, 408, 429, 500, 503)] == \
        ["", "", "", "408", "429", "5xx", "5xx"]
    assert braze_failure(200, 2.5) == "slow" and braze_failure(503, 2.5) == "5xx"


def test_the_cached_process_id_is_renewed_in_a_forked_child():
    """prometheus-client names a worker's metric files by it (proxy/serving.py, process_id)."""
    from proxy.serving import process_id

    assert process_id() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's report is the assertion below)
        try:
            os.write(write, str(process_id()).encode())
        finally:
            os._exit(0)  # never back into pytest
    os.close(write)
    reported = int(os.read(read, 32))
    os.close(read)
    os.waitpid(child, 0)
    assert reported == child != os.getpid() == process_id()
