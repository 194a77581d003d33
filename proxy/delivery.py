"""The outbox's delivery worker, one per process: claims due writes and sends them,
`concurrency` at a time, until stopped.

- Deliveries run concurrently (threads; greenlets under gevent). The outbox only lets one
  write per order key be claimed at a time, so concurrency never reorders one user point's
  choice or profile writes.
- While deliveries are in flight a heartbeat renews their lease every few seconds, so a
  delivery slower than the lease (an upstream taking 18 s) is never started a second time
  by another process; if the heartbeat is late (a starved or frozen process) the outbox
  still lets no one else claim a write whose holder process is alive (`outbox.holder_alive`). Outcomes are recorded only under this process's lease (`lease_owner`),
  so a process that lost its lease (the file unwritable for 15 s) cannot overwrite another's.
- Every `purge_every` seconds delivered rows older than the retention are purged (any
  process may do it; the outbox is shared by the box).
- A clean stop claims nothing more, lets the deliveries in flight finish and be recorded,
  and hands nothing back half done.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial

from .errors import CircuitOpen, UpstreamError, UpstreamRateLimited, WriteMisdirected
from .outbox import LEASE_SECONDS, Outbox, Write

log = logging.getLogger("ccproxy.outbox")
# Seconds between tries to record an outcome the outbox file refused (doubling up to the max).
RECORD_RETRY_FIRST = 0.5
RECORD_RETRY_MAX = 30.0


class Deliverer:
    def __init__(self, outbox: Outbox, send: Callable[[Write], None], poll: float = 0.2,
                 concurrency: int = 16, retention: float = 0.0, purge_every: float = 60.0):
        self.outbox = outbox
        self.send = send
        self.poll = poll
        self.concurrency = max(1, concurrency)
        self.retention = retention
        self.purge_every = purge_every
        self._stop = threading.Event()
        self._slots = threading.Condition()
        self._in_flight = 0
        # Ids being sent by this process: a lease that lapsed while one is in flight (a starved
        # renewal on a loaded box) must not let this very process start it a second time.
        self._sending: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._next_purge = 0.0
        self._stop_asked: float | None = None  # monotonic time of the first stop request

    def start(self) -> Deliverer:
        for name, target in (("outbox", self._run), ("outbox-lease", self._heartbeat)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def request_stop(self) -> None:
        """Stop claiming at once (the server is shutting down); deliveries in flight finish.
        Called from a signal handler: only sets the flag (the loop sees it within a poll)."""
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; wait for the deliveries in flight to be recorded, up to `timeout`
        seconds from the first stop request (the SIGTERM, when there was one)."""
        self.request_stop()
        with self._slots:
            self._slots.notify_all()
        assert self._stop_asked is not None
        deadline = self._stop_asked + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._slots:
            while self._in_flight and time.monotonic() < deadline:
                self._slots.wait(max(0.0, deadline - time.monotonic()))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def run_once(self) -> int:
        """Claim what is due for the free slots and start delivering it; how many were claimed."""
        with self._slots:
            free = self.concurrency - self._in_flight
        if free <= 0 or self._stop.is_set():
            return 0
        claimed = self.outbox.claim(free)
        for write in claimed:
            if self._stop.is_set():
                self.outbox.release(write)
                continue
            with self._slots:
                if write.id in self._sending:
                    continue  # still in flight here; its outcome is recorded under our lease
                self._sending.add(write.id)
                self._in_flight += 1
            threading.Thread(target=self._deliver_then_free, args=(write,), name="outbox-send",
                             daemon=True).start()
        return len(claimed)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._maybe_purge()
            try:
                claimed = self.run_once()
            except sqlite3.Error as exc:
                log.warning("outbox unavailable: %s", exc)
                claimed = 0
            with self._slots:
                if self._stop.is_set():
                    return
                if self._in_flight >= self.concurrency:
                    self._slots.wait(self.poll)  # until a slot frees
                elif not claimed:
                    self._slots.wait(self.poll)  # nothing due: poll again soon

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 5):
            self._renew()
        while self._in_flight:  # stopping: keep the leases of what still runs
            self._renew()
            time.sleep(0.5)

    def _renew(self) -> None:
        if not self._in_flight:
            return
        try:
            self.outbox.renew()
        except sqlite3.Error as exc:
            log.warning("outbox lease not renewed: %s", exc)

    def _maybe_purge(self) -> None:
        if not self.retention or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + min(self.purge_every, max(self.retention / 2, 0.1))
        try:
            purged = self.outbox.purge_delivered(self.retention)
        except sqlite3.Error as exc:
            log.warning("outbox purge failed: %s", exc)
            return
        if purged:
            log.info("outbox purged %d delivered writes", purged)

    def _deliver_then_free(self, write: Write) -> None:
        try:
            self._record(write, self._deliver(write))
        finally:
            with self._slots:
                self._sending.discard(write.id)
                self._in_flight -= 1
                self._slots.notify_all()

    def _deliver(self, write: Write) -> Callable[[], None]:
        """Send one write; how to record what happened (its arguments bound now: an except
        clause's name is gone once the clause ends)."""
        try:
            self.send(write)
        except UpstreamRateLimited as limited:
            if limited.upstream_status is None:  # our own budget: not an attempt
                return partial(self.outbox.postponed, write, float(limited.retry_after or 1))
            return partial(self.outbox.failed, write, limited.message)
        except CircuitOpen as open_circuit:  # nothing was sent: not an attempt either
            return partial(self.outbox.postponed, write, float(open_circuit.retry_after or 1))
        except WriteMisdirected as misdirected:  # never deliverable from here: an operator decides
            return partial(self.outbox.dead, write, misdirected.message)
        except UpstreamError as error:
            status = error.upstream_status
            if status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429):
                return partial(self.outbox.dead, write, error.message)
            return partial(self.outbox.failed, write, error.message, status not in (401, 403))
        except Exception as exc:  # never let one write stop the worker
            log.exception("outbox delivery crashed")
            return partial(self.outbox.failed, write, type(exc).__name__, False)
        return partial(self.outbox.delivered, write)

    def _record(self, write: Write, record: Callable[[], None]) -> None:
        """Record an outcome until it sticks (a full or locked file). Meanwhile the write stays
        in `_sending`, so this process never sends it again; a delivery not recorded as such
        would be, once its lease lapsed. Given up only when the process stops: after the
        restart the write is sent again (at least once, as after a crash)."""
        wait = RECORD_RETRY_FIRST
        while True:
            try:
                record()
                return
            except sqlite3.Error as exc:
                if self._stop.is_set():
                    log.error("outbox outcome of %s not recorded at shutdown (%s): it is sent again "
                              "after its lease lapses", write.id, exc)
                    return
                log.error("outbox outcome of %s not recorded (%s); trying again in %.1f s", write.id, exc, wait)
            self._stop.wait(wait)
            wait = min(wait * 2, RECORD_RETRY_MAX)
