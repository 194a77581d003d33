"""`ccproxy check` against the sandboxes, as a deployment gate."""

from __future__ import annotations

import os
import subprocess
import sys

from proxy.sandbox import amplitude


def run_check(sandboxes, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update({"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()})
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check"], capture_output=True, text=True,
                          env=env, timeout=60)


def test_every_sandbox_upstream_is_healthy(sandboxes):
    done = run_check(sandboxes)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 of 4 configured upstreams healthy" in done.stdout
    for name in ("amplitude", "experiment", "target", "mediarithmics"):
        assert f"OK   {name}" in done.stdout
    assert amplitude.DEFAULT_KEY not in done.stdout and "********et" in done.stdout


def test_a_wrong_key_is_reported_as_such(sandboxes):
    done = run_check(sandboxes, CCPROXY_AMPLITUDE_SECRET_KEY="wrong-key-123")
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if "amplitude" in line)
    assert line.startswith("FAIL") and "credential was refused" in line
    assert "wrong-key-123" not in done.stdout


def test_unreachable_and_unconfigured(sandboxes):
    done = run_check(sandboxes, CCPROXY_MEDIARITHMICS_URL="http://127.0.0.1:9", CCPROXY_TARGET_CLIENT_CODE="",
                     CCPROXY_TARGET_URL="")
    assert done.returncode == 1
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line[:4] in ("OK  ", "FAIL", "--  ")}
    assert lines["mediarithmics"].startswith("FAIL") and "upstream_unavailable" in lines["mediarithmics"]
    assert lines["target"].startswith("--") and "CCPROXY_TARGET_CLIENT_CODE" in lines["target"]


def test_malformed_setting_is_named(sandboxes):
    done = run_check(sandboxes, CCPROXY_REQUEST_DEADLINE="soon")
    assert done.returncode == 2 and "CCPROXY_REQUEST_DEADLINE must be a number" in done.stderr
