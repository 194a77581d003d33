"""Marketer previews kept apart from the send path.

`ccproxy serve` runs gevent workers: while one greenlet computes, every other request of
its worker waits, cache hits included. So a Liquid preview (any text anyone holding a key
may post) never renders in a worker. It runs in one of the worker's render processes
(`preview_worker.py`: niced, address space capped, no credentials), which is killed when it
overruns `CCPROXY_PREVIEW_TIMEOUT`: python-liquid cannot be interrupted, a process can. The
worker's greenlet only waits on a socket, and answers the render's `connected_content`
calls from the proxy's own cached endpoints (GET only, `track=false`: previews never write
or track), so a preview shows what Braze would get.

Admission: `CCPROXY_PREVIEW_CONCURRENCY` previews at once per worker process (Liquid
previews and the preview page's template renders together); one more is turned away at
once with 503 `preview_busy` and `Retry-After`, never queued. `/v1/render/*` is on the send
path (Braze calls it) and never takes a slot.

Per process: the slots and the render processes belong to one gunicorn worker, so a
deployment renders at most workers x `CCPROXY_PREVIEW_CONCURRENCY` previews at once.
Render processes start on first use, are reused, and exit when their worker does (their
socket closes).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LiquidError, PreviewBusy, RenderLimitExceeded
from .liquid_preview import Resolver
from .preview_worker import receive, send
from .render_limits import LiquidLimits

# A niced interpreter starting on a busy machine; its start is not part of the render's budget.
log = logging.getLogger("ccproxy")
STARTUP_TIMEOUT = 20.0
RETRY_AFTER = 1
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class RenderProcess:
    """One render process and the worker's end of its socket."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket):
        self.proc, self.sock = proc, sock

    @classmethod
    def start(cls) -> RenderProcess:
        ours, theirs = socket.socketpair()
        # Credentials stay in the worker; the package is importable however the proxy was started.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.preview_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        process = cls(proc, ours)
        try:
            ours.settimeout(STARTUP_TIMEOUT)
            if receive(ours).get("op") != "ready":
                raise EOFError("unexpected first message")
        except (OSError, EOFError, ValueError):
            process.kill()
            raise PreviewBusy("the preview renderer did not start; try again shortly",
                              retry_after=RETRY_AFTER) from None
        return process

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job: dict[str, Any], resolver: Resolver, limits: LiquidLimits) -> dict[str, Any]:
        """Send one render, answer its fetches, return its outcome; stopped at the deadline."""
        deadline = time.monotonic() + limits.timeout
        try:
            self._send(job, deadline)
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                message = receive(self.sock)
                if message.get("op") != "fetch":
                    return message
                args = message.get("args")
                query = {str(k): str(v) for k, v in args.items()} if isinstance(args, dict) else {}
                fetched = resolver(str(message.get("path", "")), query)
                self._send({"status": fetched.status, "body": fetched.body, "cache": fetched.cache}, deadline)
        except TimeoutError:
            raise RenderLimitExceeded(limits.timeout_message()) from None
        except (EOFError, OSError, ValueError) as exc:
            log.warning("a preview render process failed: %r (exit status %s)", exc, self.proc.poll())
            raise RenderLimitExceeded(limits.crash_message()) from None

    def _send(self, message: dict[str, Any], deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        send(self.sock, message)

    def kill(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _kill_all(processes: list[RenderProcess]) -> None:
    while processes:
        processes.pop().kill()


class PreviewPool:
    """This process's preview slots and idle render processes."""

    def __init__(self, size: int, limits: LiquidLimits):
        self.size, self.limits = size, limits
        self._lock = threading.Lock()
        self._busy = 0
        self._idle: list[RenderProcess] = []
        self._pid = os.getpid()
        self.started = 0
        weakref.finalize(self, _kill_all, self._idle)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one preview slot, or answer 503 preview_busy at once."""
        with self._lock:
            if self._busy >= self.size:
                raise PreviewBusy(
                    f"{self.size} previews are already rendering in this process "
                    "(CCPROXY_PREVIEW_CONCURRENCY); try again shortly", retry_after=RETRY_AFTER)
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def render_liquid(self, source: str, attributes: dict[str, Any], resolver: Resolver,
                      allowed_hosts: set[str], content_blocks: Path | None = None) -> dict[str, Any]:
        """The answer of POST /v1/preview/liquid, rendered in a render process."""
        job = {"op": "render", "source": source, "attributes": attributes,
               "allowed_hosts": sorted(allowed_hosts), "limits": self.limits.as_json(),
               "content_blocks": str(content_blocks) if content_blocks else ""}
        with self.slot():
            process = self._take()
            try:
                outcome = process.run(job, resolver, self.limits)
            except BaseException:
                process.kill()
                raise
            if outcome.get("restart"):
                process.kill()
            else:
                self._give_back(process)
        if outcome.get("op") == "done" and isinstance(outcome.get("answer"), dict):
            return outcome["answer"]
        message = str(outcome.get("message") or "the render failed")
        if outcome.get("code") == "liquid_limit":
            raise RenderLimitExceeded(message)
        raise LiquidError(message)

    def _take(self) -> RenderProcess:
        with self._lock:
            if self._pid != os.getpid():  # forked: those processes belong to the parent
                self._idle[:] = []
                self._pid = os.getpid()
            while self._idle:
                process = self._idle.pop()
                if process.alive():
                    return process
                process.kill()
        process = RenderProcess.start()
        self.started += 1
        return process

    def _give_back(self, process: RenderProcess) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(process)
                return
        process.kill()
