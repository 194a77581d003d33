"""Run a sandbox WSGI app on a loopback port in a background thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

from werkzeug.serving import make_server


class RunningServer:
    """A threaded werkzeug server; `url` is its scheme://host:port base."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self._server = make_server(host, port, app, threaded=True)
        self._server.daemon_threads = True  # type: ignore[attr-defined]
        self.host, self.port = host, self._server.server_port
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        # gunicorn forks workers from the process that started us; their exit unwinds the
        # same stack, and only the owner has the serving thread to stop.
        self._owner_pid = os.getpid()

    def start(self) -> RunningServer:
        # Quiet werkzeug's per-request log lines; the sandbox is not the thing under test.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._thread.start()
        return self

    def stop(self) -> None:
        if os.getpid() != self._owner_pid:
            return
        self._server.shutdown()
        self._server.server_close()


class RateWindow:
    """A sliding one-minute window, as an upstream's per-minute rate limit counts."""

    def __init__(self, per_minute: int | None):
        self.per_minute = per_minute
        self._calls: deque[float] = deque()
        self._lock = threading.Lock()

    def retry_after(self) -> int | None:
        """None when this call is allowed, else the seconds until one is."""
        if not self.per_minute:
            return None
        now = time.monotonic()
        with self._lock:
            while self._calls and now - self._calls[0] >= 60:
                self._calls.popleft()
            if len(self._calls) >= self.per_minute:
                return max(1, int(60 - (now - self._calls[0])) + 1)
            self._calls.append(now)
            return None
