"""The README's first command on a clean virtualenv: install the package (no extras) and run
the demo, so a missing runtime dependency cannot hide behind the test extras."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

import requests
from test_cli import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent


def test_clean_install_runs_the_demo(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    port = free_port()
    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen([str(env_dir / "bin" / "ccproxy"), "demo", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, proc, seconds=30)
        body = requests.get(f"{base}/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2",
                            timeout=5).json()
        assert body["item_1"] == "cookie" and body["recommendations"]["testRecId2"]["item_1"] == "bulgogi"
        assert requests.get(f"{base}/preview", timeout=5).status_code == 200  # package data installed
        assert "recs_block" in requests.get(f"{base}/v1/templates", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()
    assert sys.executable != str(python)
