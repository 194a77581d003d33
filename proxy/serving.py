"""Production serving on gunicorn with gevent workers.

Connected Content calls are I/O bound (the proxy mostly waits on an upstream),
so each worker must hold many requests in flight: gevent gives thousands per
worker where sync workers give one and gthread a fixed thread count (see the
README and bench/RESULTS.md for the measurements).
"""

from __future__ import annotations

import errno
import gc
import logging
import math
import os
import queue
import shutil
import signal
import socket
import sqlite3
import tempfile
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Settings
from .connections import guarded_worker_class
from .errors import CannotListen

BACKLOG = 2048


def default_workers() -> int:
    # gevent workers are not blocked by I/O, so one per core uses the CPUs.
    return max(1, os.cpu_count() or 1)


def gunicorn_options(host: str, port: int, workers: int, log_level: str = "info") -> dict[str, Any]:
    """The server settings `ccproxy serve` uses (the benchmark's baseline uses them too)."""
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gevent",
        "worker_connections": 4000,
        # Longer than load balancers' idle timeouts so they never reuse a closed socket.
        "keepalive": 75,
        # SIGTERM: stop accepting, let in-flight requests finish for up to this long (Braze
        # gives up on any call after 2 s). `serve` lengthens it to cover an outbox delivery.
        "graceful_timeout": 5,
        "timeout": 30,
        "backlog": BACKLOG,
        "loglevel": log_level.lower(),
        "errorlog": "-",
        # The proxy writes its own JSON access log (with request ids), not gunicorn's.
        "accesslog": None,
        # gunicorn 23+ opens a control socket under $HOME; the proxy writes no files there.
        "control_socket_disable": True,
        # File answers go through the guarded socket's sendall (proxy/connections.py): its send
        # clock and unread-answer count see every byte, which the kernel's sendfile bypasses.
        "sendfile": False,
        # Worker heartbeat files in memory, not on disk.
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
    }


def delivery_grace(settings: Settings) -> int:
    """Seconds a stopping worker is given: the longest a delivery in flight can take
    (connect + CCPROXY_OUTBOX_WRITE_TIMEOUT) and a margin to record its outcome. A stop cut
    shorter (gunicorn's SIGKILL) could land after mediarithmics took a write and before the
    outbox knew, and the write would be sent again after the restart. An idle stop does not
    wait for it: idle connections are closed at once, and a worker ends when nothing runs."""
    return math.ceil(settings.upstream_connect_timeout + settings.outbox_write_timeout) + 5


def _on_worker_fork(_server: Any, _worker: Any) -> None:
    """In a new worker, right after the fork: until gunicorn installs the worker's own signal
    handlers, a SIGTERM would run the master's inherited handler, which only queues it in
    this process's copy of the master's queue, and the worker would live on until the
    master's SIGKILL at the end of the graceful period. Booting, it has accepted nothing
    and claimed nothing: the default action (end now) is right. A stop that came even
    earlier (a busy machine may run the master's SIGTERM before this hook) sits in this
    process's copy of that queue: it ends the worker now too."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    inherited = getattr(_server, "SIG_QUEUE", None)
    while inherited is not None:
        try:
            if inherited.get_nowait() in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                os._exit(0)
        except queue.Empty:
            break


# New connections a worker takes per turn of its event loop (gunicorn's gevent worker takes
# one when there are several workers, so no worker grabs a whole burst; see fair_worker_class).
ACCEPT_BATCH = 16


def fair_worker_class(base: type, accept_batch: int = ACCEPT_BATCH) -> type:
    """`base` (a gevent worker) made fair between keep-alive connections at saturation.

    gevent's socket reads switch to another greenlet only when no data is waiting. Under load
    the client's next request on a kept-alive connection is often in the buffer by the time
    the worker has written the previous answer, so one greenlet serves its connection request
    after request while the others wait: over a 6 s run at 32 connections some connections got
    18 times the answers of others, and at 256 some got a single answer while others got a
    thousand (bench/RESULTS.md, "requests served per connection"). Yielding once after each
    answer puts that connection behind the others that are ready, so each is served in turn.

    New connections: with more than one worker, gunicorn accepts one connection per turn of
    the event loop; when every turn also runs up to gevent's switch interval of answers, a
    burst of new connections (Braze opens hundreds) waits seconds to be accepted. A batch of
    `accept_batch` per turn takes a burst in a few turns; which worker accepts stays the
    kernel's race, as before (per process: each worker balances only its own connections)."""
    from gevent import sleep
    from gevent.server import StreamServer

    class BatchAcceptServer(StreamServer):  # type: ignore[misc]
        # gunicorn sets max_accept = 1 on the server it builds; this keeps the batch.
        max_accept = property(lambda self: accept_batch, lambda self, value: None)

    class FairWorker(base):  # type: ignore[misc, valid-type]
        def init_process(self) -> None:
            # After the fork, in this worker only: gunicorn builds its servers from this name.
            import gunicorn.workers.ggevent as ggevent

            ggevent.StreamServer = BatchAcceptServer
            super().init_process()

        def handle_request(self, *args: Any) -> Any:
            try:
                return super().handle_request(*args)
            finally:
                self.after_answer()

        def after_answer(self) -> None:  # the fast lane's answers too (proxy/fast_lane.py)
            sleep(0)

    FairWorker.__name__ = FairWorker.__qualname__ = f"Fair{base.__name__}"
    return FairWorker


def _on_worker_start(worker: Any) -> None:
    """In each worker: keep the start-up objects out of garbage collections, start background
    delivery of the outbox (create_app builds the app
    and starts nothing); on SIGTERM stop claiming outbox writes at once, before gunicorn
    waits for open connections; the deliveries in flight then have the graceful period
    (`delivery_grace`) to finish and be recorded."""
    from .services import of_app

    # Everything imported and built so far lives as long as the worker: out of every full
    # garbage collection from now on (each one pauses every request in flight in this worker).
    # No collection first: it would walk the whole heap while the worker is not yet accepting.
    gc.freeze()
    services = of_app(worker.wsgi)
    if not worker.alive:  # told to stop while it was loading the app
        return
    services.start_delivery()
    handle_exit = worker.handle_exit

    def on_term(signum: int, frame: Any) -> None:
        services.stop_delivering()
        handle_exit(signum, frame)
        guard = getattr(worker, "guard", None)
        if guard is not None:
            guard.shed_idle()

    signal.signal(signal.SIGTERM, on_term)


def _on_child_exit(_server: Any, worker: Any) -> None:
    """In the master, after any worker ends (killed included): its live gauges stop counting."""
    from prometheus_client import multiprocess

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.mark_process_dead(worker.pid, directory)


def metrics_dir(configured: str) -> tuple[str, bool]:
    """The directory the workers share metric values in (prometheus-client's multiprocess
    mode), empty of any earlier run's files; and whether it is ours to remove at exit."""
    if not configured:
        parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        return tempfile.mkdtemp(prefix="ccproxy-metrics-", dir=parent), True
    os.makedirs(configured, exist_ok=True)
    _empty_metrics_dir(configured)
    return configured, False


def _empty_metrics_dir(directory: str) -> None:
    # Only prometheus-client's own files: the directory may be shared with nothing else, but
    # an operator's typo must not cost them other files.
    for name in os.listdir(directory):
        if name.endswith(".db"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def box_cache_path(settings: Settings) -> tuple[str, str]:
    """The box cache file the workers share, started afresh (see proxy/box_cache.py), and a
    directory of ours to remove at exit ("" when the path was configured, or no box cache)."""
    from . import box_cache

    if settings.redis_url or not settings.box_cache:
        return "", ""
    ours = ""
    path = settings.box_cache_path
    try:
        if not path:
            parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            ours = tempfile.mkdtemp(prefix="ccproxy-cache-", dir=parent)
            path = os.path.join(ours, "box-cache.sqlite3")
        box_cache.prepare(path)
    except (OSError, sqlite3.Error) as exc:
        # Not fatal: each worker degrades to its own memory cache and says so.
        logging.getLogger("ccproxy").warning("box cache %s cannot be prepared (%s); each worker "
                                             "caches on its own until it can be written", path, exc)
    return path, ours


# prometheus-client asks for the process id on every increment, to notice a fork: a getpid
# syscall each time, three per cache hit (6% of a hit's CPU under load, bench/RESULTS.md).
# This id, renewed in every forked child before anything else runs there, tells it the same.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def process_id() -> int:
    return _pid


def _use_metrics_dir(directory: str) -> None:
    """Turn on multiprocess mode for the workers gunicorn is about to fork."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    # Set even when imported after the variable: the default would ask the kernel each time.
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[attr-defined]


def _on_worker_exit(_server: Any, worker: Any) -> None:
    """Record the deliveries in flight before the worker process ends."""
    services = getattr(worker.wsgi, "extensions", {}).get("ccproxy")
    if services is not None:
        services.close()


class WsgiServer(BaseApplication):
    """gunicorn running the app that `load_app()` builds in each worker (after the fork, so
    after gevent has patched the standard library)."""

    def __init__(self, load_app: Callable[[], Any], options: dict[str, Any]):
        self.load_app = load_app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self.load_app()


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port now, as gunicorn would (SO_REUSEADDR, same backlog).

    Binding before anything is logged or started means a busy port is one clear line
    (CannotListen) instead of "listening on ..." followed by gunicorn's five retries; the
    bound socket is handed to gunicorn as `fd://`, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror):
            reason = f"unknown host ({exc.strerror})"
        elif exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        else:
            reason = (exc.strerror or str(exc)).lower()
        raise CannotListen(f"cannot listen on {where}: {reason}") from None
    return sock


def serve(settings: Settings, listener: socket.socket, workers: int | None = None,
          on_ready: Callable[[], None] | None = None) -> None:
    """Run the app on gunicorn over `listener` (from `listen()`); `on_ready` runs in the
    master once gunicorn is serving the socket, before the workers boot."""
    box_path, box_dir = box_cache_path(settings)
    if box_path:
        settings = settings.replace(box_cache_path=box_path)

    def load_app() -> Any:
        from . import create_app

        return create_app(settings)

    host, port = listener.getsockname()[:2]
    options = gunicorn_options(host, port, workers or default_workers(), settings.log_level)
    # gunicorn dups the descriptor and closes ours; the socket stays inheritable for its workers.
    listener.set_inheritable(True)
    options["bind"] = f"fd://{listener.detach()}"
    directory, ours = metrics_dir(settings.metrics_dir)
    _use_metrics_dir(directory)
    options.update(
        child_exit=_on_child_exit,
        when_ready=(lambda _arbiter: on_ready()) if on_ready else None,
        post_worker_init=_on_worker_start, worker_exit=_on_worker_exit,
        # Slow and silent clients: see proxy/connections.py. One more than the cap, so the
        # worker keeps accepting and can shed an idle connection for the new one.
        worker_class=fair_worker_class(guarded_worker_class(settings)),
        worker_connections=settings.max_connections + 1,
        keepalive=max(1, round(settings.keepalive_timeout)),
        post_fork=_on_worker_fork,
        graceful_timeout=delivery_grace(settings),
    )
    master = os.getpid()
    try:
        WsgiServer(load_app, options).run()
    finally:
        # Workers leave through here too (gunicorn ends them with SystemExit): only the master cleans.
        if os.getpid() == master:
            if box_dir:
                shutil.rmtree(box_dir, ignore_errors=True)
            elif box_path:
                from .box_cache import remove

                remove(box_path)
            if ours:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                _empty_metrics_dir(directory)
