"""The README's first command on a clean virtualenv: install the package (no extras) and run
the demo, so a missing runtime dependency cannot hide behind the test extras."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def test_clean_install_runs_the_demo(tmp_path, servers):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    demo = servers.start(["demo", "--workers", "1"], command=[str(env_dir / "bin" / "ccproxy")],
                         clean_env=True, cwd=tmp_path)
    base = demo.base
    body = requests.get(f"{base}/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2",
                            timeout=5).json()
    assert body["item_1"] == "cookie" and body["recommendations"]["testRecId2"]["item_1"] == "bulgogi"
    assert requests.get(f"{base}/preview", timeout=5).status_code == 200  # package data installed
    assert "recs_block" in requests.get(f"{base}/v1/templates", timeout=5).text
    assert demo.terminate() == 0
    assert sys.executable != str(python)
