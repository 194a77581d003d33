"""Production serving on gunicorn with gevent workers.

Connected Content calls are I/O bound (the proxy mostly waits on an upstream),
so each worker must hold many requests in flight: gevent gives thousands per
worker where sync workers give one and gthread a fixed thread count.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Settings


def default_workers() -> int:
    # gevent workers are not blocked by I/O, so one per core uses the CPUs.
    return max(1, os.cpu_count() or 1)


class ProxyServer(BaseApplication):
    """gunicorn running `create_app(settings)` in each worker (built after the fork)."""

    def __init__(self, settings: Settings, options: dict[str, Any]):
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self):
        from . import create_app

        return create_app(self.settings)


def serve(settings: Settings, host: str, port: int, workers: int | None = None, **extra: Any) -> None:
    options = {
        "bind": f"{host}:{port}",
        "workers": workers or default_workers(),
        "worker_class": "gevent",
        "worker_connections": 2000,
        # Longer than load balancers' idle timeouts so they never reuse a closed socket.
        "keepalive": 75,
        # SIGTERM: stop accepting, let in-flight requests finish for up to this long. Idle
        # keep-alive connections hold a gevent worker until then, and Braze gives up on any
        # call after 2 s, so a few seconds finish every useful request.
        "graceful_timeout": 5,
        "timeout": 30,
        "loglevel": settings.log_level.lower(),
        "errorlog": "-",
        # The proxy writes its own JSON access log (with request ids), not gunicorn's.
        "accesslog": None,
        # Worker heartbeat files in memory, not on disk.
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        # gunicorn 23+ opens a control socket under $HOME; the proxy writes no files there.
        "control_socket_disable": True,
        **extra,
    }
    ProxyServer(settings, options).run()
