"""The commands a new user runs: `ccproxy demo` and `ccproxy serve`, as real processes on gunicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from proxy.sandbox import amplitude


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            requests.get(url + "/healthz", timeout=0.5)
            return
        except (requests.ConnectionError, requests.Timeout):  # a worker still booting
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def run():
    procs = []

    def start(args, env=None):
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_demo_answers_curl_with_real_data(run):
    port = free_port()
    proc = run(["demo", "--port", str(port), "--workers", "1"])
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, proc)
    r = requests.get(f"{base}/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2", timeout=5)
    assert r.status_code == 200
    assert r.headers["Server"].startswith("gunicorn")
    body = r.json()
    assert body["item_1"] == "cookie" and body["recommendations"]["testRecId2"]["item_1"] == "bulgogi"
    proc.send_signal(signal.SIGTERM)
    try:
        output = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)])
        raise
    assert f"listening on {base}" in output
    assert "sandbox amplitude upstream listening on http://127.0.0.1:" in output


def test_serve_uses_environment_settings_and_api_keys(run, sandboxes):
    port = free_port()
    env = {
        "CCPROXY_AMPLITUDE_URL": sandboxes.servers["amplitude"].url,
        "CCPROXY_AMPLITUDE_SECRET_KEY": amplitude.DEFAULT_KEY,
        "CCPROXY_API_KEYS": "old-key-123,new-key-456",
    }
    proc = run(["serve", "--port", str(port), "--workers", "1"], env)
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, proc)
    url = f"{base}/v1/amplitude/cohorts?user_id=testUser&cohort_id=cohort7"
    denied = requests.get(url, timeout=5)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert denied.headers["WWW-Authenticate"].startswith("Basic")
    body = requests.get(url, headers={"Authorization": "Bearer new-key-456"}, timeout=5).json()
    assert body["member"] is True
    assert requests.get(url, auth=("braze", "old-key-123"), timeout=5).status_code == 200
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=20)[0]
    assert amplitude.DEFAULT_KEY not in output


def test_bad_setting_exits_with_a_named_error(run):
    proc = run(["serve", "--port", str(free_port()), "--no-auth"], {"CCPROXY_CACHE_MAXSIZE": "lots"})
    output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 2
    assert "CCPROXY_CACHE_MAXSIZE must be a number" in output


def test_serve_refuses_to_start_without_keys(run):
    proc = run(["serve", "--port", str(free_port())], {"CCPROXY_API_KEYS": ""})
    output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 2 and "CCPROXY_API_KEYS" in output and "--no-auth" in output


def test_demo_refuses_a_public_address_without_keys(run):
    proc = run(["demo", "--host", "0.0.0.0", "--port", str(free_port())], {"CCPROXY_API_KEYS": ""})
    output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 2 and "loopback" in output
