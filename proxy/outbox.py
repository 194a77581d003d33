"""A durable outbox for writes to mediarithmics: nothing accepted is lost or silently doubled.

A write is committed to SQLite (WAL, synchronous=FULL) before the proxy answers 202, then
delivered by `delivery.Deliverer` with retries, jittered exponential backoff and the
upstream's rate limit. One file is shared by every process of a box (SQLite locks);
what is per process is said where it matters.

- **Idempotency**: a write may carry a scoped key (`idempotency.IdemKey`). A unique index on
  it, checked and written in the write's own transaction, makes one row per key while the
  key lives, whichever process or thread got there first.
- **Lanes**: consent (choices) first, then profile updates, then activities and opens: a
  claim takes the lowest lane first, so an unsubscribe never waits behind a send's opens.
- **Order**: writes to the same user point and processing (or profile) carry one
  `order_key`; only the oldest pending one of a key can be claimed, so concurrent
  deliveries never reorder an unsubscribe and a resubscribe.
- **Leases**: a claim leases writes to this process; the deliverer renews the lease while a
  delivery is in flight. A renewal can be late (a starved or frozen process), so a lapsed
  lease is only taken over when its holder is gone: the lease names the holder's host, PID
  namespace, pid and process start time, and a claim checks that process (`holder_alive`).
  A write being sent by a live process is never started a second time, however slow. After
  a crash the holder is gone: its write is taken over at once, whatever its lease says (a
  wall clock stepped back would make it look hours long), and delivered again with its id
  and key (at least once). A holder on another host or PID namespace (a shared file
  system) cannot be checked: there the lease alone decides.
- **Bounds**: delivered rows are purged after the retention (never while their idempotency
  key lives); opens and activities are refused at intake past `max_rows` undelivered rows;
  consent and profile writes are only refused when the disk itself refuses them.

States: queued -> delivered | failed (retrying) -> delivered | dead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import IdempotencyKeyReused, OutboxUnavailable

if TYPE_CHECKING:
    from .idempotency import IdemKey

log = logging.getLogger("ccproxy.outbox")
LEASE_SECONDS = 15.0
# Lanes by kind: lower is delivered first.
LANES = {"choice": 0, "profile": 1, "activity": 2}
LANE_NAMES = {lane: kind for kind, lane in LANES.items()}
PENDING = "state IN ('queued','failed')"
STATES = ("queued", "failed", "delivered", "dead")
COLUMNS = ("id, kind, method, path, query, body, state, attempts, last_error, created_at,"
           " delivered_at, lane, seq, order_key")
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
"""
# Added since the first release: an existing outbox is upgraded in place.
NEW_COLUMNS = {
    "lane": "INTEGER NOT NULL DEFAULT 2",
    "seq": "INTEGER",
    "order_key": "TEXT",
    "idem_key": "TEXT",
    "idem_hash": "TEXT",
    "idem_until": "REAL",
}
INDEXES = f"""
DROP INDEX IF EXISTS writes_due;
CREATE UNIQUE INDEX IF NOT EXISTS writes_idem ON writes (idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS writes_lane ON writes (lane, seq) WHERE {PENDING};
CREATE INDEX IF NOT EXISTS writes_order ON writes (order_key, seq) WHERE order_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS writes_seq ON writes (seq);
CREATE INDEX IF NOT EXISTS writes_delivered ON writes (delivered_at) WHERE state = 'delivered';
CREATE INDEX IF NOT EXISTS writes_state ON writes (state);
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
    lane: int = 2
    seq: int = 0
    order_key: str | None = None

    def status(self) -> dict[str, Any]:
        """What GET /v1/mediarithmics/writes/<id> answers."""
        return {
            "ok": True, "id": self.id, "kind": self.kind, "state": self.state,
            "attempts": self.attempts, "last_error": self.last_error or "",
            "created_at": _iso(self.created_at), "delivered_at": _iso(self.delivered_at),
        }


@dataclass(frozen=True)
class Added:
    """The outcome of storing a write: its id, and whether its key named an earlier one."""

    id: str
    duplicate: bool = False
    state: str = "queued"  # a duplicate's: what became of the earlier write


@dataclass(frozen=True)
class Superseded:
    """A dead letter `retry` left alone: a later write (`by`, now `by_state`) replaced it."""

    id: str
    kind: str
    by: str
    by_state: str


@dataclass(frozen=True)
class Retried:
    requeued: int
    skipped: list[Superseded]


@dataclass(frozen=True)
class LaneStats:
    depth: int
    oldest_age: float


def _iso(moment: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)) if moment else ""


def backoff(attempts: int, cap: float = 300.0) -> float:
    """Seconds before the next try: exponential, capped, jittered +-50%."""
    return min(cap, 0.5 * 2 ** min(attempts, 12)) * random.uniform(0.5, 1.5)


def order_key(kind: str, path: str) -> str | None:
    """Writes that must arrive in the order accepted: one user point's choice for one
    processing, or one profile (the upstream path names both). Activities are independent."""
    return path if kind in ("choice", "profile") else None


def is_busy(exc: BaseException) -> bool:
    """Another writer held the file for longer than we would wait: not a broken outbox."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Outbox:
    """The write store. Every public method runs its SQLite work off the event loop."""

    def __init__(self, path: str, max_attempts: int = 25, max_backoff: float = 300.0,
                 busy_timeout: float = 2.0, max_rows: int = 0, migrate_timeout: float = 30.0):
        # Absolute, so a later change of working directory cannot point it at another file.
        self.path = os.path.abspath(path)
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.busy_timeout = busy_timeout
        self.max_rows = max_rows
        self.owner = lease_owner()
        # Per process: intake refusals by reason (metrics).
        self.dropped: Counter[str] = Counter()
        self._pending_estimate: tuple[float, int] = (0.0, 0)
        self._write_check: tuple[float, str] = (-WRITE_CHECK_TTL, "")
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Off the event loop: it may wait for another process's migration (several workers
        # start at once); `ccproxy serve` opens the outbox when a worker starts, so this is
        # never on a request's clock.
        off_the_event_loop(self._migrate, migrate_timeout)

    def _migrate(self, timeout: float) -> None:
        db = self._connect(timeout=timeout)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")  # several workers may start at once
            db.execute(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(writes)")}
            for column, decl in NEW_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE writes ADD COLUMN {column} {decl}")
            if "seq" not in have:  # rows of an older outbox: keep their order and lanes
                db.execute("UPDATE writes SET seq = rowid, lane = CASE kind WHEN 'choice' THEN 0"
                           " WHEN 'profile' THEN 1 ELSE 2 END,"
                           " order_key = CASE WHEN kind IN ('choice','profile') THEN path END")
            for statement in INDEXES.strip().split(";\n"):
                db.execute(statement.rstrip(";"))
            db.execute("COMMIT")
        finally:
            db.close()

    def _connect(self, timeout: float | None = None, durable: bool = True) -> sqlite3.Connection:
        """One connection per operation: safe across threads, greenlets and forks. Accepting a
        write syncs to disk before the 202 (synchronous=FULL); delivery bookkeeping (claims,
        leases, outcomes) does not wait for the disk (NORMAL: WAL keeps it safe from a crash
        of the process; a power cut may forget an outcome, and the write is sent again, at
        least once), so the drain rate is not the disk's sync rate."""
        db = sqlite3.connect(self.path, timeout=self.busy_timeout if timeout is None else timeout,
                             isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            db.close()  # never leak an open file (a full disk fails here; it blocks a remount)
            raise
        return db

    def _for_request(self, function: Callable[..., Any], *args: Any, budget: float | None = None) -> Any:
        """Run `function(*args, timeout=...)` for a caller that waits (a request): it must start
        within `budget` (the busy timeout by default) and waits for a busy file at most what
        is left of it, so a locked outbox is a prompt 503, never a hang; a call that could not
        start in time raises as a busy file would, before touching anything."""
        budget = self.busy_timeout if budget is None else budget
        deadline = time.monotonic() + max(budget, MIN_START_WAIT)

        def bounded() -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise sqlite3.OperationalError("database is locked (the outbox is busy)")
            return function(*args, timeout=max(0.001, min(budget, left)))

        return off_the_event_loop(bounded, pool="intake")

    # -- intake ---------------------------------------------------------------------------

    def add(self, kind: str, method: str, path: str, query: dict[str, str], body: Any,
            timeout: float | None = None, *, idem: IdemKey | None = None,
            write_id: str | None = None, sheddable: bool = False) -> Added:
        """Store a write durably. With `idem`, a live key answers the earlier write
        (`duplicate`) or raises IdempotencyKeyReused; `sheddable` writes (opens, activities)
        raise OutboxUnavailable past the row cap (a duplicate of an accepted write is still
        answered as one: the key is looked up first). Raises sqlite3.Error when not stored."""
        full = sheddable and self._over_cap()
        added = self._for_request(self._add_now, kind, method, path, query, body, idem, write_id,
                                  full, budget=timeout)
        if added is None:
            self.dropped["outbox_full"] += 1
            raise OutboxUnavailable(f"the outbox holds {self.max_rows} or more undelivered writes; "
                                    "new activities are refused until it drains",
                                    code="outbox_full", retry_after=30)
        if not added.duplicate:
            with self._lock:
                stamp, count = self._pending_estimate
                self._pending_estimate = (stamp, count + 1)
        return added

    def _over_cap(self) -> bool:
        """Whether the undelivered rows reach the cap; counted at most once a second per
        process (a count is a scan), so the cap may be passed by one second of intake."""
        if not self.max_rows:
            return False
        with self._lock:
            stamp, count = self._pending_estimate
        if time.monotonic() - stamp >= 1.0:
            try:
                count = self._for_request(self._pending_now)
            except sqlite3.Error:
                return False  # storing will say what is wrong
            with self._lock:
                self._pending_estimate = (time.monotonic(), count)
        return count >= self.max_rows

    def has_pending(self, kind: str, path: str) -> bool:
        """Whether a write that must keep its order (a choice, a profile) for `path` is still
        waiting for delivery: what the upstream says now is not the state it will have.
        OutboxUnavailable when the file cannot say (busy, unreadable)."""
        key = order_key(kind, path)
        return key is not None and bool(self._asked(self._has_pending_now, key))

    def holds_latest(self, idem: IdemKey) -> bool:
        """Whether a live idempotency key names a write stored here that no later write of
        its order key (the same user point and processing) follows (OutboxUnavailable when
        the file cannot say)."""
        return bool(self._asked(self._holds_latest_now, idem.key))

    def _holds_latest_now(self, key: str, timeout: float | None = None) -> bool:
        db = self._connect(timeout)
        try:
            return db.execute(
                "SELECT 1 FROM writes w WHERE w.idem_key = ? AND w.idem_until >= ? AND (w.order_key IS NULL"
                " OR NOT EXISTS (SELECT 1 FROM writes p WHERE p.order_key = w.order_key AND p.seq > w.seq))",
                (key, time.time())).fetchone() is not None
        finally:
            db.close()

    def _asked(self, function: Callable[..., Any], *args: Any) -> Any:
        """A request's question to the file: a busy or broken file is a 503, not a 500."""
        try:
            return self._for_request(function, *args)
        except sqlite3.Error as exc:
            raise OutboxUnavailable("the outbox cannot be read just now",
                                    retry_after=1 if is_busy(exc) else 5) from None

    def _has_pending_now(self, key: str, timeout: float | None = None) -> bool:
        db = self._connect(timeout)
        try:
            return db.execute(f"SELECT 1 FROM writes WHERE order_key = ? AND {PENDING} LIMIT 1",
                              (key,)).fetchone() is not None
        finally:
            db.close()

    def _pending_now(self, timeout: float | None = None) -> int:
        db = self._connect(timeout)
        try:
            return int(db.execute(f"SELECT COUNT(*) FROM writes WHERE {PENDING}").fetchone()[0])
        finally:
            db.close()

    def _add_now(self, kind: str, method: str, path: str, query: dict[str, str], body: Any,
                 idem: IdemKey | None, write_id: str | None, full: bool = False,
                 timeout: float | None = None) -> Added | None:
        """Store it (None: refused, the outbox is `full`); a live key's earlier write first."""
        write_id = write_id or uuid.uuid4().hex
        now = time.time()
        db = self._connect(timeout)
        try:
            db.execute("BEGIN IMMEDIATE")
            if idem is not None:
                row = db.execute("SELECT id, idem_hash, idem_until, state FROM writes WHERE idem_key = ?",
                                 (idem.key,)).fetchone()
                if row is not None and row[2] >= now:
                    db.execute("ROLLBACK")
                    if row[1] != idem.body_hash:
                        raise IdempotencyKeyReused(
                            "this idempotency key was first used with a different request; "
                            "use a new key for a new write")
                    return Added(row[0], duplicate=True, state=row[3])
                if row is not None:  # expired: the key may name a new write
                    db.execute("UPDATE writes SET idem_key = NULL WHERE id = ?", (row[0],))
            if full:
                db.execute("ROLLBACK")
                return None
            db.execute(
                "INSERT INTO writes (id, kind, method, path, query, body, state, next_attempt_at,"
                " created_at, lane, seq, order_key, idem_key, idem_hash, idem_until)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?,"
                " (SELECT COALESCE(MAX(seq), 0) + 1 FROM writes), ?, ?, ?, ?)",
                (write_id, kind, method, path, json.dumps(query), json.dumps(body), now, now,
                 LANES.get(kind, 2), order_key(kind, path),
                 idem.key if idem else None, idem.body_hash if idem else None,
                 now + idem.ttl if idem else None),
            )
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
        return Added(write_id)

    # -- reading --------------------------------------------------------------------------

    def get(self, write_id: str) -> Write | None:
        return self._for_request(self._get_now, write_id)

    def list_writes(self, state: str | None = None, limit: int = 100) -> list[Write]:
        return off_the_event_loop(self._list_writes_now, state, limit)

    def counts(self) -> dict[str, int]:
        return self._for_request(self._counts_now)

    def lane_stats(self) -> dict[str, LaneStats]:
        """Undelivered writes per lane and the age of the oldest (for every process of the box)."""
        return self._for_request(self._lane_stats_now)

    def write_problem(self, min_free_bytes: int, fresh: bool = False) -> str:
        """Why a write could not be recorded now ("" when it could): /readyz asks. The answer
        is kept for a second per process: /readyz is open to anyone, and a committed test
        write on every probe would compete with real intake for the file's lock."""
        now = time.monotonic()
        checked_at, problem = self._write_check
        if fresh or now - checked_at >= WRITE_CHECK_TTL:
            problem = off_the_event_loop(self._write_problem_now, min_free_bytes, pool="intake")
            self._write_check = (time.monotonic(), problem)
        return problem

    def _write_problem_now(self, min_free_bytes: int) -> str:
        # A read-only or full file system first, then a real committed write: SQLite's own
        # view (locks, page limit, a file that cannot grow).
        problem = filesystem_problem(self.path, min_free_bytes)
        if problem:
            return problem
        try:
            db = self._connect(timeout=0.5)
            try:
                db.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))
            finally:
                db.close()
        except sqlite3.Error as exc:
            return f"a test write failed ({exc})"
        return ""


    def _get_now(self, write_id: str, timeout: float | None = None) -> Write | None:
        db = self._connect(timeout)
        try:
            row = db.execute(f"SELECT {COLUMNS} FROM writes WHERE id = ?", (write_id,)).fetchone()
        finally:
            db.close()
        return _write(row) if row else None

    def _list_writes_now(self, state: str | None = None, limit: int = 100) -> list[Write]:
        db = self._connect()
        try:
            sql = f"SELECT {COLUMNS} FROM writes"
            args: tuple = ()
            if state:
                sql += " WHERE state = ?"
                args = (state,)
            rows = db.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        finally:
            db.close()
        return [_write(row) for row in rows]

    def _counts_now(self, timeout: float | None = None) -> dict[str, int]:
        """Writes by state, every state named (0 when none is in it)."""
        db = self._connect(timeout)
        try:
            found = dict(db.execute("SELECT state, COUNT(*) FROM writes GROUP BY state").fetchall())
        finally:
            db.close()
        return {**dict.fromkeys(STATES, 0), **found}

    def _lane_stats_now(self, timeout: float | None = None) -> dict[str, LaneStats]:
        now = time.time()
        db = self._connect(timeout)
        try:
            rows = db.execute(f"SELECT lane, COUNT(*), MIN(created_at) FROM writes WHERE {PENDING}"
                              " GROUP BY lane").fetchall()
        finally:
            db.close()
        stats = {name: LaneStats(0, 0.0) for name in LANES}
        for lane, depth, oldest in rows:
            stats[LANE_NAMES.get(lane, "activity")] = LaneStats(depth, max(0.0, now - oldest))
        return stats

    # -- operator commands ------------------------------------------------------------------

    def retry(self, write_id: str | None = None) -> int:
        """Requeue one dead letter (or all of them); how many were requeued."""
        return self.retry_dead(write_id).requeued

    def retry_dead(self, write_id: str | None = None) -> Retried:
        """Requeue one dead letter (or all of them), except a choice or profile write that a
        later write of the same user point and processing (or profile) superseded: sending
        an old subscribe after a later unsubscribe would revert consent. Those are skipped
        and reported; they stay dead letters."""
        return off_the_event_loop(self._retry_dead_now, write_id)

    def _retry_dead_now(self, write_id: str | None) -> Retried:
        db = self._connect(durable=False)
        requeued, skipped = 0, []
        try:
            db.execute("BEGIN IMMEDIATE")  # no write may be accepted between the check and the requeue
            sql = "SELECT id, kind, order_key, seq FROM writes WHERE state='dead'"
            dead = db.execute(sql + (" AND id=?" if write_id else "") + " ORDER BY seq",
                              (write_id,) if write_id else ()).fetchall()
            for dead_id, kind, key, seq in dead:
                later = None if key is None else db.execute(
                    "SELECT id, state FROM writes WHERE order_key=? AND seq>? ORDER BY seq DESC LIMIT 1",
                    (key, seq)).fetchone()
                if later is not None:
                    skipped.append(Superseded(dead_id, kind, later[0], later[1]))
                    continue
                requeued += db.execute("UPDATE writes SET state='queued', attempts=0, next_attempt_at=?"
                                       " WHERE id=?", (time.time(), dead_id)).rowcount
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
        return Retried(requeued, skipped)

    def purge_dead(self, write_id: str | None = None) -> int:
        """Delete one dead letter (or all of them); how many were deleted."""
        return off_the_event_loop(self._change_dead, write_id, "DELETE FROM writes WHERE state='dead'", ())

    def _change_dead(self, write_id: str | None, sql: str, args: tuple) -> int:
        db = self._connect()
        try:
            if write_id:
                return db.execute(sql + " AND id=?", (*args, write_id)).rowcount
            return db.execute(sql, args).rowcount
        finally:
            db.close()

    def purge_delivered(self, retention: float, batch: int = 5000) -> int:
        """Delete rows delivered more than `retention` seconds ago, whose idempotency key has
        expired too (a key keeps its row); in batches, so no writer waits long."""
        return off_the_event_loop(self._purge_delivered_now, retention, batch)

    def _purge_delivered_now(self, retention: float, batch: int) -> int:
        # A delivered choice or profile write that supersedes an older dead letter is kept
        # while that letter is: it is what tells `retry` not to send the older one.
        now = time.time()
        total = 0
        db = self._connect()
        try:
            while True:
                deleted = db.execute(
                    "DELETE FROM writes WHERE rowid IN (SELECT w.rowid FROM writes w WHERE w.state='delivered'"
                    " AND w.delivered_at < ? AND (w.idem_until IS NULL OR w.idem_until < ?)"
                    " AND (w.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM writes d"
                    "  WHERE d.order_key = w.order_key AND d.state='dead' AND d.seq < w.seq)) LIMIT ?)",
                    (now - retention, now, batch)).rowcount
                total += deleted
                if deleted < batch:
                    return total
        finally:
            db.close()

    # -- delivery -------------------------------------------------------------------------

    def claim(self, limit: int = 10) -> list[Write]:
        return off_the_event_loop(self._claim_now, limit)

    def _claim_now(self, limit: int = 10) -> list[Write]:
        """Lease up to `limit` due writes to this process: lowest lane first, then oldest;
        of writes sharing an order key, only the oldest pending one."""
        now = time.time()
        db = self._connect(durable=False)
        db.create_function("holder_alive", 1, holder_alive)
        db.create_function("holder_gone", 1, holder_gone)
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                f"UPDATE writes SET lease_owner=?, lease_until=? WHERE id IN ("
                # The lane index walks in delivery order: no sort of every pending row.
                f" SELECT w.id FROM writes w INDEXED BY writes_lane WHERE w.{PENDING} AND w.next_attempt_at<=?"
                # A lapsed lease of a live process is still its own (see the module docstring).
                f" AND (w.lease_until IS NULL OR (w.lease_until<?"
                f"  AND (w.lease_owner=? OR NOT holder_alive(w.lease_owner))) OR holder_gone(w.lease_owner))"
                f" AND (w.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM writes p"
                f"  WHERE p.order_key = w.order_key AND p.seq < w.seq AND p.{PENDING}))"
                f" ORDER BY w.lane, w.seq LIMIT ?) RETURNING {COLUMNS}",
                (self.owner, now + LEASE_SECONDS, now, now, self.owner, limit),
            ).fetchall()
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
        return sorted((_write(row) for row in rows), key=lambda w: (w.lane, w.seq))

    def renew(self) -> int:
        """Extend the lease of every write this process holds (deliveries in flight)."""
        return off_the_event_loop(self._renew_now)

    def _renew_now(self) -> int:
        db = self._connect(timeout=5.0, durable=False)
        try:
            return db.execute(f"UPDATE writes SET lease_until=? WHERE lease_owner=? AND {PENDING}",
                              (time.time() + LEASE_SECONDS, self.owner)).rowcount
        finally:
            db.close()

    def _finish(self, write_id: str, sql: str, args: tuple) -> None:
        off_the_event_loop(self._finish_now, write_id, sql, args)

    def _finish_now(self, write_id: str, sql: str, args: tuple) -> None:
        db = self._connect(timeout=30.0, durable=False)  # recorded even on a busy file
        try:
            db.execute(sql + " WHERE id=? AND lease_owner=?", (*args, write_id, self.owner))
        finally:
            db.close()

    def delivered(self, write: Write) -> None:
        self._finish(write.id, "UPDATE writes SET state='delivered', attempts=attempts+1,"
                     " delivered_at=?, lease_owner=NULL, lease_until=NULL, last_error=NULL", (time.time(),))

    def failed(self, write: Write, error: str, temporary: bool = True) -> None:
        """A failure: try again after a backoff. Past `max_attempts` a write becomes a dead
        letter, except consent failing for a `temporary` reason (5xx, timeouts, 408/429, the
        network): a recipient was told "unsubscribed", so a choice write keeps its place at the
        longest backoff (and in the lane's age, which the outbox alerts watch). One that cannot
        succeed as it is (refused credentials, a crash) dies, or it would hold back every later
        choice of its user point and processing."""
        attempts = write.attempts + 1
        if attempts >= self.max_attempts and not (temporary and write.lane == LANES["choice"]):
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


WRITE_CHECK_TTL = 1.0  # seconds a /readyz outbox check is reused within one process
# A request's outbox call may wait this long for a thread even when its busy budget is
# shorter (a pixel's 50 ms): handing work to a thread takes time on a loaded machine.
MIN_START_WAIT = 0.5


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot: /proc/<pid>/stat field 22), None
    when it is gone or a zombie. With the pid it names one process: pids are reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def _pid_namespace() -> str:
    try:
        return "".join(ch for ch in os.readlink("/proc/self/ns/pid") if ch.isdigit())
    except OSError:
        return "-"


def lease_owner() -> str:
    """This process, as its leases name it: host/PID namespace/pid/start time/nonce."""
    pid = os.getpid()
    return "/".join((socket.gethostname(), _pid_namespace(), str(pid), _start_time(pid) or "-",
                     uuid.uuid4().hex[:8]))


def _checkable(owner: str | None) -> tuple[int, str] | None:
    """The pid and start time of a lease's process, when this process can look it up (same
    host and PID namespace, a lease of this layout)."""
    parts = (owner or "").split("/")
    if len(parts) != 5 or parts[0] != socket.gethostname() or parts[1] != _pid_namespace():
        return None
    if not parts[2].isdigit() or parts[3] == "-":
        return None
    return int(parts[2]), parts[3]


def holder_alive(owner: str | None) -> bool:
    """Whether the process named by a lease (`lease_owner()`) still runs. One this process
    cannot check (another host or PID namespace, an older outbox's owner) counts as gone:
    its lease alone decides, as before."""
    process = _checkable(owner)
    return process is not None and _start_time(process[0]) == process[1]


def holder_gone(owner: str | None) -> bool:
    """Whether the process named by a lease is known to have ended: its lease protects
    nothing, however long it seems to run (a wall clock stepped back after the crash would
    otherwise hold the write for the size of the step). Unknown is not gone."""
    process = _checkable(owner)
    return process is not None and _start_time(process[0]) != process[1]


def filesystem_problem(path: str, min_free_bytes: int) -> str:
    """Why the file system of the outbox at `path` cannot take writes ("" when it can). As
    root, file modes say nothing: ask the file system itself."""
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        return f"its directory cannot be examined ({exc.strerror})"
    if fs.f_flag & os.ST_RDONLY:
        return "its file system is read-only"
    free = fs.f_bavail * fs.f_frsize
    if free < min_free_bytes:
        return f"its file system has {free // 1024} KB free, under the {min_free_bytes // 1024} KB wanted"
    return ""


# The outbox's own threads, per process: SQLite waits (a busy file, an fsync) never occupy
# gevent's hub pool, which also resolves host names (a locked outbox once delayed every
# upstream's DNS by 30 s). Requests and delivery bookkeeping get separate pools, so a
# delivery outcome waiting out a lock never makes a request wait behind it.
POOL_THREADS = {"intake": 4, "delivery": 4}
_pools: dict[tuple[int, str], Any] = {}
_pools_lock = threading.Lock()


def _pool(name: str) -> Any:
    """This process's pool `name` (a fork gets new ones: threads do not survive it)."""
    from gevent.threadpool import ThreadPool

    key = (os.getpid(), name)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPool(POOL_THREADS[name])
    return pool


def off_the_event_loop(function: Callable[..., Any], *args: Any, pool: str = "delivery") -> Any:
    """Run blocking file I/O (SQLite commits fsync) where it cannot stall a gevent worker:
    in the outbox's own thread pool when the process is monkey-patched, else right here."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return function(*args)
    if not monkey.is_module_patched("threading"):
        return function(*args)
    return _pool(pool).apply(function, args)


def _write(row: tuple) -> Write:
    (write_id, kind, method, path, query, body, state, attempts, last_error, created, delivered,
     lane, seq, key) = row
    return Write(write_id, kind, method, path, json.loads(query), json.loads(body), state, attempts,
                 last_error, created, delivered, lane, seq or 0, key)
