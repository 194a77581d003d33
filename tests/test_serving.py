"""The proxy as `ccproxy serve` runs it (gunicorn + gevent), under concurrent load, and its logs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import upstream_calls

from proxy.sandbox import amplitude, experiment, mediarithmics

SECRETS = {
    "CCPROXY_AMPLITUDE_SECRET_KEY": amplitude.DEFAULT_KEY,
    "CCPROXY_EXPERIMENT_DEPLOYMENT_KEY": experiment.DEFAULT_KEY,
    "CCPROXY_MEDIARITHMICS_TOKEN": mediarithmics.DEFAULT_TOKEN,
    "CCPROXY_API_KEYS": "inbound-key-7d1f9a",
}


@pytest.fixture
def served(sandboxes, servers):
    env = {**SECRETS, "CCPROXY_LOG_LEVEL": "DEBUG",
           # Counts are asserted here, not speed: a loaded machine must not turn a wait into a 503.
           "CCPROXY_REQUEST_DEADLINE": "20", "CCPROXY_COALESCE_WAIT": "20",
           # Nor a slow upstream answer (0.3 s of latency, stretched by the load) into a timeout.
           "CCPROXY_UPSTREAM_READ_TIMEOUT": "15"}
    env.update({"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()})
    server = servers.start(["serve", "--workers", "1"], env)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {SECRETS['CCPROXY_API_KEYS']}"
    yield server.base, session, server


def test_200_concurrent_identical_cold_requests_make_one_upstream_call(served, sandboxes):
    base, _session, _proc = served
    sandboxes.state("amplitude").latency = 0.3
    url = f"{base}/v1/amplitude/recommendations?user_id=crowd&rec_id=testRecId"

    def one(_):
        return requests.get(url, headers={"X-Api-Key": SECRETS["CCPROXY_API_KEYS"]}, timeout=60)

    try:
        with ThreadPoolExecutor(max_workers=200) as pool:
            answers = list(pool.map(one, range(200)))
    finally:
        sandboxes.state("amplitude").latency = 0
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert upstream_calls(sandboxes) == 1


def test_no_secret_in_any_log_line(served, sandboxes):
    base, session, proc = served
    # Exercise the paths that log: misses, hits, upstream failures, bad input, auth failures.
    session.get(f"{base}/v1/amplitude/profile?user_id=testUser&rec_id=testRecId")
    session.get(f"{base}/v1/amplitude/profile?user_id=testUser&rec_id=testRecId")
    sandboxes.state("amplitude").set_fault("error", count=1)
    session.get(f"{base}/v1/amplitude/properties?user_id=failing")
    session.get(f"{base}/v1/experiment/variants?user_id=u&context=%7Bbad")
    session.get(f"{base}/v1/mediarithmics/profile?user_point_id=p1")
    requests.get(f"{base}/v1/amplitude/properties?user_id=x", headers={"Authorization": "Bearer wrong"}, timeout=5)
    output = proc.stop_and_read()
    assert "upstream failure" in output  # the logs did record what happened
    for name, secret in SECRETS.items():
        for part in secret.split(","):
            assert part not in output, f"{name} leaked into the logs"


def test_a_stop_queued_before_a_new_worker_took_over_its_signals_ends_it_at_once():
    """Between gunicorn's fork and its post_fork hook the child still runs the master's
    handler, which only queues a SIGTERM in the child's copy of the master's queue: the hook
    finds it there and ends the new worker, instead of it living out the graceful period."""
    import subprocess
    import sys

    script = ("import queue, signal, types\n"
              "from proxy.serving import _on_worker_fork\n"
              "q = queue.SimpleQueue(); q.put_nowait(signal.SIGCHLD); q.put_nowait(signal.SIGTERM)\n"
              "_on_worker_fork(types.SimpleNamespace(SIG_QUEUE=q), None)\n"
              "print('still running')\n")
    stopped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and "still running" not in stopped.stdout, stopped.stderr
    calm = subprocess.run([sys.executable, "-c", script.replace("q.put_nowait(signal.SIGTERM)", "")],
                          capture_output=True, text=True, timeout=60)
    assert calm.returncode == 0 and "still running" in calm.stdout, calm.stderr
