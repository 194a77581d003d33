"""A durable outbox for writes to mediarithmics: nothing accepted is lost.

A write is committed to SQLite (WAL, synchronous=FULL) before the proxy answers 202, then
delivered by a background worker with retries, jittered exponential backoff and the
upstream's rate limit. Deliveries are claimed with a short lease, so several processes
can share one outbox and none delivers a write another is delivering. A clean stop lets
the deliveries in flight finish and be recorded, so nothing is delivered twice across a
clean restart (after a crash, a write whose delivery was cut off is retried once its
lease expires: at least once). Writes the upstream rejects as invalid (4xx but 429) are
dead letters, kept with the upstream's message until retried by `ccproxy outbox retry`.

States: queued -> delivered | failed (retrying) -> delivered | dead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UpstreamError, UpstreamRateLimited

log = logging.getLogger("ccproxy.outbox")
LEASE_SECONDS = 15.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS writes (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS writes_due ON writes (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL);
"""


@dataclass(frozen=True)
class Write:
    id: str
    kind: str
    method: str
    path: str
    query: dict[str, str]
    body: Any
    state: str
    attempts: int
    last_error: str | None
    created_at: float
    delivered_at: float | None

    def status(self) -> dict[str, Any]:
        """What GET /v1/mediarithmics/writes/<id> answers."""
        return {
            "ok": True, "id": self.id, "kind": self.kind, "state": self.state,
            "attempts": self.attempts, "last_error": self.last_error or "",
            "created_at": _iso(self.created_at), "delivered_at": _iso(self.delivered_at),
        }


def _iso(moment: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)) if moment else ""


def backoff(attempts: int, cap: float = 300.0) -> float:
    """Seconds before the next try: exponential, capped, jittered +-50%."""
    return min(cap, 0.5 * 2 ** min(attempts, 12)) * random.uniform(0.5, 1.5)


class Outbox:
    """The write store. Every public method runs its SQLite work off the event loop."""
    def __init__(self, path: str, max_attempts: int = 25, max_backoff: float = 300.0,
                 busy_timeout: float = 2.0):
        # Absolute, so a later change of working directory cannot point it at another file.
        self.path = os.path.abspath(path)
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.busy_timeout = busy_timeout
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self, timeout: float | None = None) -> sqlite3.Connection:
        # One connection per operation: safe across threads, greenlets and forks.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout if timeout is None else timeout,
                             isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            db.close()  # never leak an open file (a full disk fails here; it blocks a remount)
            raise
        return db

    def add(self, kind: str, method: str, path: str, query: dict[str, str], body: Any,
            timeout: float | None = None) -> str:
        """Store a write durably; its id. Raises sqlite3.Error if it could not be stored."""
        return off_the_event_loop(self._add_now, kind, method, path, query, body, timeout)

    def get(self, write_id: str) -> Write | None:
        return off_the_event_loop(self._get_now, write_id)

    def list_writes(self, state: str | None = None, limit: int = 100) -> list[Write]:
        return off_the_event_loop(self._list_writes_now, state, limit)

    def counts(self) -> dict[str, int]:
        return off_the_event_loop(self._counts_now)

    def retry(self, write_id: str | None = None) -> int:
        return off_the_event_loop(self._retry_now, write_id)

    def write_problem(self, min_free_bytes: int) -> str:
        """Why a write could not be recorded now ("" when it could): /readyz asks."""
        return off_the_event_loop(self._write_problem_now, min_free_bytes)

    def _write_problem_now(self, min_free_bytes: int) -> str:
        # A read-only or full file system first (as root, file modes say nothing), then a real
        # committed write: SQLite's own view (locks, page limit, a file that cannot grow).
        try:
            fs = os.statvfs(os.path.dirname(self.path))
        except OSError as exc:
            return f"its directory cannot be examined ({exc.strerror})"
        if fs.f_flag & os.ST_RDONLY:
            return "its file system is read-only"
        free = fs.f_bavail * fs.f_frsize
        if free < min_free_bytes:
            return f"its file system has {free // 1024} KB free, under the {min_free_bytes // 1024} KB wanted"
        try:
            db = self._connect(timeout=0.5)
            try:
                db.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))
            finally:
                db.close()
        except sqlite3.Error as exc:
            return f"a test write failed ({exc})"
        return ""

    def claim(self, limit: int = 10) -> list[Write]:
        return off_the_event_loop(self._claim_now, limit)

    def _finish(self, write_id: str, sql: str, args: tuple) -> None:
        off_the_event_loop(self._finish_now, write_id, sql, args)

    def _add_now(self, kind: str, method: str, path: str, query: dict[str, str], body: Any,
                 timeout: float | None = None) -> str:
        write_id = uuid.uuid4().hex
        now = time.time()
        db = self._connect(timeout)
        try:
            db.execute(
                "INSERT INTO writes (id, kind, method, path, query, body, state, next_attempt_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (write_id, kind, method, path, json.dumps(query), json.dumps(body), now, now),
            )
        finally:
            db.close()
        return write_id

    def _get_now(self, write_id: str) -> Write | None:
        db = self._connect()
        try:
            row = db.execute(
                "SELECT id, kind, method, path, query, body, state, attempts, last_error, created_at,"
                " delivered_at FROM writes WHERE id = ?", (write_id,)).fetchone()
        finally:
            db.close()
        return _write(row) if row else None

    def _list_writes_now(self, state: str | None = None, limit: int = 100) -> list[Write]:
        db = self._connect()
        try:
            sql = ("SELECT id, kind, method, path, query, body, state, attempts, last_error, created_at,"
                   " delivered_at FROM writes")
            args: tuple = ()
            if state:
                sql += " WHERE state = ?"
                args = (state,)
            rows = db.execute(sql + " ORDER BY created_at LIMIT ?", (*args, limit)).fetchall()
        finally:
            db.close()
        return [_write(row) for row in rows]

    def _counts_now(self) -> dict[str, int]:
        db = self._connect()
        try:
            return dict(db.execute("SELECT state, COUNT(*) FROM writes GROUP BY state").fetchall())
        finally:
            db.close()

    def _retry_now(self, write_id: str | None = None) -> int:
        """Requeue one dead letter (or all of them); how many were requeued."""
        db = self._connect()
        try:
            if write_id:
                cursor = db.execute("UPDATE writes SET state='queued', attempts=0, next_attempt_at=?"
                                    " WHERE id=? AND state='dead'", (time.time(), write_id))
            else:
                cursor = db.execute("UPDATE writes SET state='queued', attempts=0, next_attempt_at=?"
                                    " WHERE state='dead'", (time.time(),))
            return cursor.rowcount
        finally:
            db.close()

    def _claim_now(self, limit: int = 10) -> list[Write]:
        """Lease up to `limit` due writes to this process."""
        now = time.time()
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "UPDATE writes SET lease_owner=?, lease_until=? WHERE id IN ("
                " SELECT id FROM writes WHERE state IN ('queued','failed') AND next_attempt_at<=?"
                " AND (lease_until IS NULL OR lease_until<?) ORDER BY next_attempt_at LIMIT ?)"
                " RETURNING id, kind, method, path, query, body, state, attempts, last_error,"
                " created_at, delivered_at",
                (self.owner, now + LEASE_SECONDS, now, now, limit),
            ).fetchall()
            db.execute("COMMIT")
        finally:
            db.close()
        return [_write(row) for row in rows]

    def _finish_now(self, write_id: str, sql: str, args: tuple) -> None:
        db = self._connect(timeout=30.0)  # an outcome must be recorded, even on a busy file
        try:
            db.execute(sql + " WHERE id=? AND lease_owner=?", (*args, write_id, self.owner))
        finally:
            db.close()

    def delivered(self, write: Write) -> None:
        self._finish(write.id, "UPDATE writes SET state='delivered', attempts=attempts+1,"
                     " delivered_at=?, lease_owner=NULL, lease_until=NULL, last_error=NULL", (time.time(),))

    def failed(self, write: Write, error: str) -> None:
        attempts = write.attempts + 1
        if attempts >= self.max_attempts:
            self.dead(write, f"gave up after {attempts} attempts: {error}")
            return
        self._finish(write.id, "UPDATE writes SET state='failed', attempts=?, next_attempt_at=?,"
                     " last_error=?, lease_owner=NULL, lease_until=NULL",
                     (attempts, time.time() + backoff(attempts, self.max_backoff), error))

    def postponed(self, write: Write, seconds: float) -> None:
        """Not attempted (the proxy's rate budget is spent): try later, no attempt counted."""
        self._finish(write.id, "UPDATE writes SET next_attempt_at=?, lease_owner=NULL, lease_until=NULL",
                     (time.time() + seconds,))

    def release(self, write: Write) -> None:
        """Give a claimed write back untouched (shutting down)."""
        self._finish(write.id, "UPDATE writes SET lease_owner=NULL, lease_until=NULL", ())

    def dead(self, write: Write, error: str) -> None:
        self._finish(write.id, "UPDATE writes SET state='dead', attempts=attempts+1, last_error=?,"
                     " lease_owner=NULL, lease_until=NULL", (error,))


def off_the_event_loop(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking file I/O (SQLite commits fsync) where it cannot stall a gevent worker:
    in gevent's thread pool when the process is monkey-patched, else right here."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return function(*args)
    if not monkey.is_module_patched("threading"):
        return function(*args)
    return get_hub().threadpool.apply(function, args)


def _write(row: tuple) -> Write:
    (write_id, kind, method, path, query, body, state, attempts, last_error, created, delivered) = row
    return Write(write_id, kind, method, path, json.loads(query), json.loads(body), state, attempts,
                 last_error, created, delivered)


class Deliverer:
    """The background worker: claims due writes and sends them, until stopped."""

    def __init__(self, outbox: Outbox, send: Callable[[Write], None], poll: float = 0.2):
        self.outbox = outbox
        self.send = send
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Deliverer:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Stop claiming at once (the server is shutting down); deliveries in flight finish."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; wait for the deliveries in flight to be recorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> int:
        """Deliver what is due now; how many writes were handled. When asked to stop, the
        delivery in flight finishes and the rest of the batch is handed back at once."""
        claimed = self.outbox.claim()
        for write in claimed:
            if self._stop.is_set():
                self.outbox.release(write)
            else:
                self._deliver(write)
        return len(claimed)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except sqlite3.Error as exc:
                log.warning("outbox unavailable: %s", exc)
                handled = 0
            if not handled:
                self._stop.wait(self.poll)

    def _deliver(self, write: Write) -> None:
        try:
            self.send(write)
        except UpstreamRateLimited as limited:
            if limited.upstream_status is None:  # our own budget: not an attempt
                self.outbox.postponed(write, float(limited.retry_after or 1))
            else:
                self.outbox.failed(write, limited.message)
        except UpstreamError as error:
            status = error.upstream_status
            if status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429):
                self.outbox.dead(write, error.message)
            else:
                self.outbox.failed(write, error.message)
        except Exception as exc:  # never let one write stop the worker
            log.exception("outbox delivery crashed")
            self.outbox.failed(write, f"{type(exc).__name__}")
        else:
            self.outbox.delivered(write)
