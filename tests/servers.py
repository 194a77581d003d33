"""Real server processes for tests: free ports, readiness waits that tolerate a busy machine,
and a fixture that stops every process it started, even when the test fails.

A CI machine runs other work beside the tests: a gunicorn worker may take seconds to boot
and a first answer may be slow. Readiness is therefore an overall deadline, and a slow or
refused answer inside it is a reason to try again, never to fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import requests

# Generous on purpose: an overall limit for a boot on a loaded 2-core machine, not a speed check.
READY_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None = None, seconds: float = READY_SECONDS,
                  path: str = "/healthz") -> None:
    """Poll `url + path` until it answers 200, the process exits, or `seconds` pass.

    Each try may take a few seconds (a worker still importing answers late); any transport
    failure, timeouts included, is retried until the overall deadline."""
    deadline = time.monotonic() + seconds
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with status {proc.returncode} before it was up")
        try:
            answer = requests.get(url + path, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise AssertionError(f"{url}{path} did not come up within {seconds:.0f} s (last: {last})")


def wait_for(condition, seconds: float = 60.0, poll: float = 0.05, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value (returned) or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:.0f} s")
        time.sleep(poll)


class Server:
    """One started process (its own process group, output to a file) and where it listens."""

    def __init__(self, proc: subprocess.Popen, base: str, log_path: Path, log: IO[str]):
        self.proc, self.base, self.log_path, self._log = proc, base, log_path, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (a clean stop), then SIGKILL to the whole group if it does not stop (the
        timeout outlasts `ccproxy serve`'s graceful period, 36 s by default)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def stop_and_read(self) -> str:
        self.terminate()
        return self.output()

    def kill(self) -> None:
        """SIGKILL the process and everything it started (gunicorn's workers too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def close(self) -> None:
        self.terminate()
        try:  # leftover workers of a master that died first
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


class Servers:
    """Starts `ccproxy` (or any command) processes; `close()` stops every one of them."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[Server] = []

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None, *, port: int | None = None,
              wait: bool = True, command: Sequence[str] | None = None, clean_env: bool = False,
              cwd: Path | None = None) -> Server:
        """Run `ccproxy <args>` (or `command`), output to a file; wait for /healthz if `wait`.

        `port`: a `--port` is added when the args have none. `clean_env`: drop the caller's
        CCPROXY_* variables so only `env` configures the server."""
        args = list(args)
        if "--port" not in args and port is None:
            port = free_port()
        if port is not None and "--port" not in args:
            args += ["--port", str(port)]
        port = int(args[args.index("--port") + 1]) if "--port" in args else port
        base_env = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("CCPROXY_"))}
        log_path = self.workdir / f"server-{len(self.started)}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "proxy.cli"]), *args],
            stdout=log, stderr=subprocess.STDOUT, text=True, env={**base_env, **(env or {})},
            start_new_session=True, cwd=cwd,
        )
        server = Server(proc, f"http://127.0.0.1:{port}", log_path, log)
        self.started.append(server)
        if wait:
            wait_until_up(server.base, proc)
        return server

    def close(self) -> None:
        for server in self.started:
            server.close()


def servers_fixture(tmp_path: Path) -> Iterator[Servers]:
    running = Servers(tmp_path)
    try:
        yield running
    finally:
        running.close()
