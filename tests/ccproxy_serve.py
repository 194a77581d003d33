"""Run `ccproxy serve` as a subprocess on the sandboxes for a test, and always stop it.

(Waits with an overall deadline; output goes to a file, never an unread pipe.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from servers import free_port, wait_until_up


@contextmanager
def serving(sandboxes, log_path: Path, env: dict[str, str], workers: int = 2,
            wrap=lambda command: command) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `ccproxy serve --no-auth` with `env` on top of the sandboxes'
    settings; `wrap(command)` may run it inside something (e.g. a mount namespace)."""
    port = free_port()
    full_env = {**os.environ, "CCPROXY_LOG_LEVEL": "WARNING"}
    full_env.update({"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()})
    full_env.update(env)
    command = [sys.executable, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(port),
               "--workers", str(workers)]
    with log_path.open("w+") as log_file:
        proc = subprocess.Popen(wrap(command), stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base, proc)
            yield base, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
