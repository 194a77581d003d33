"""The commands a new user runs: `ccproxy demo` and `ccproxy serve`, as real processes on gunicorn."""

from __future__ import annotations

import subprocess

import requests
from servers import wait_for

from proxy.sandbox import amplitude


def run_to_end(servers, args, env=None) -> tuple[int, str]:
    """Run a ccproxy command that should stop by itself; its exit status and output."""
    server = servers.start(args, env, wait=False)
    try:
        code = server.proc.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ccproxy {' '.join(args)} did not exit") from None
    return code, server.output()


def test_demo_answers_curl_with_real_data(servers):
    demo = servers.start(["demo", "--workers", "1"])
    base = demo.base
    r = requests.get(f"{base}/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2", timeout=5)
    assert r.status_code == 200
    assert r.headers["Server"].startswith("gunicorn")
    body = r.json()
    assert body["item_1"] == "cookie" and body["recommendations"]["testRecId2"]["item_1"] == "bulgogi"
    output = demo.stop_and_read()
    assert demo.proc.returncode == 0
    assert f"listening on {base}" in output
    assert "sandbox amplitude upstream listening on http://127.0.0.1:" in output


def test_demo_writes_go_to_an_outbox_of_its_own(servers, tmp_path):
    """The default outbox file in the working directory is the one `ccproxy serve` delivers
    later, with the production token: a demo's writes must never be left in it."""
    production = tmp_path / "ccproxy-outbox.sqlite3"  # where `serve` would deliver from
    demo = servers.start(["demo", "--workers", "1"], {"CCPROXY_OUTBOX_PATH": str(production)}, cwd=tmp_path)
    r = requests.post(f"{demo.base}/v1/mediarithmics/activities", timeout=10, json={
        "$type": "TOUCH", "$ts": 1735689600000, "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "h"}]})
    assert r.status_code == 202
    demo.stop_and_read()
    assert not production.exists()


def test_a_demo_worker_that_ends_leaves_the_demo_outbox_to_the_others(servers):
    """Each worker ending runs the demo's clean-up path too: only the master removes its outbox."""
    import os
    import signal
    from pathlib import Path

    demo = servers.start(["demo", "--workers", "2"])
    write = {"$type": "TOUCH", "$ts": 1735689600000, "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "h"}]}
    assert requests.post(f"{demo.base}/v1/mediarithmics/activities", json=write, timeout=10).status_code == 202
    children = Path(f"/proc/{demo.proc.pid}/task/{demo.proc.pid}/children")
    workers = {int(p) for p in children.read_text().split()}
    os.kill(min(workers), signal.SIGTERM)  # that worker ends; gunicorn starts another
    wait_for(lambda: {int(p) for p in children.read_text().split()} - workers, seconds=60, what="a new worker")
    for _ in range(6):  # whichever worker answers
        assert requests.post(f"{demo.base}/v1/mediarithmics/activities", json=write, timeout=10).status_code == 202
    demo.stop_and_read()


def test_serve_uses_environment_settings_and_api_keys(servers, sandboxes):
    env = {
        "CCPROXY_AMPLITUDE_URL": sandboxes.servers["amplitude"].url,
        "CCPROXY_AMPLITUDE_SECRET_KEY": amplitude.DEFAULT_KEY,
        "CCPROXY_API_KEYS": "old-key-123,new-key-456",
    }
    served = servers.start(["serve", "--workers", "1"], env)
    url = f"{served.base}/v1/amplitude/cohorts?user_id=testUser&cohort_id=cohort7"
    denied = requests.get(url, timeout=5)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert denied.headers["WWW-Authenticate"].startswith("Basic")
    body = requests.get(url, headers={"Authorization": "Bearer new-key-456"}, timeout=5).json()
    assert body["member"] is True
    assert requests.get(url, auth=("braze", "old-key-123"), timeout=5).status_code == 200
    output = served.stop_and_read()
    assert amplitude.DEFAULT_KEY not in output


def test_bad_setting_exits_with_a_named_error(servers):
    code, output = run_to_end(servers, ["serve", "--no-auth"], {"CCPROXY_CACHE_MAXSIZE": "lots"})
    assert code == 2
    assert "CCPROXY_CACHE_MAXSIZE must be a number" in output


def test_a_fallbacks_file_that_cannot_work_stops_serve_before_it_listens(servers, tmp_path):
    fallbacks = tmp_path / "fallbacks.toml"
    fallbacks.write_text('["/v1/amplitude/recommendations"]\nitems = ["a", nan]\n')
    code, output = run_to_end(servers, ["serve", "--no-auth"], {"CCPROXY_FALLBACKS_FILE": str(fallbacks)})
    assert code == 2 and "listening" not in output and "Traceback" not in output
    assert "/v1/amplitude/recommendations.items[1] is a date, inf or nan" in output


def test_serve_refuses_to_start_without_keys(servers):
    code, output = run_to_end(servers, ["serve"], {"CCPROXY_API_KEYS": ""})
    assert code == 2 and "CCPROXY_API_KEYS" in output and "--no-auth" in output


def test_demo_refuses_a_public_address_without_keys(servers):
    code, output = run_to_end(servers, ["demo", "--host", "0.0.0.0"], {"CCPROXY_API_KEYS": ""})
    assert code == 2 and "loopback" in output


def _occupied_port():
    """A listening socket on a free loopback port (what another program on the port looks like)."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


def test_demo_on_a_busy_port_is_one_line_naming_the_port(servers):
    holder, port = _occupied_port()
    with holder:
        code, output = run_to_end(servers, ["demo", "--workers", "1", "--port", str(port)])
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [f"ccproxy: cannot listen on 127.0.0.1:{port}: address already in use"], output
    assert "listening" not in output.replace("cannot listen", "")


def test_serve_on_a_busy_port_is_one_line_naming_the_port(servers):
    holder, port = _occupied_port()
    with holder:
        code, output = run_to_end(servers, ["serve", "--no-auth", "--workers", "1", "--port", str(port)])
    assert code != 0
    assert [line for line in output.splitlines() if line.strip()] == [
        f"ccproxy: cannot listen on 127.0.0.1:{port}: address already in use"], output


def test_listening_is_said_once_the_port_is_bound(servers):
    served = servers.start(["serve", "--no-auth", "--workers", "1"])
    assert requests.get(f"{served.base}/healthz", timeout=5).status_code == 200
    output = served.stop_and_read()
    assert served.proc.returncode == 0
    # one line from the proxy, said after gunicorn took the socket and before workers boot
    assert output.count(f"ccproxy listening on {served.base} (auth off)") == 1
    assert output.index(f"ccproxy listening on {served.base}") < output.index("Booting worker")


def test_serve_runs_ccproxy_workers_when_it_is_set(servers, sandboxes):
    env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
    server = servers.start(["serve", "--no-auth"], {**env, "CCPROXY_WORKERS": "3"})
    wait_for(lambda: server.output().count("Booting worker") >= 3, seconds=60, what="3 workers booted")
    assert server.stop_and_read().count("Booting worker") == 3  # not one per core
