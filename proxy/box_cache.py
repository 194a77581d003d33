"""The box cache: one answer cache for every worker process of one machine, without Redis.

`ccproxy serve` forks several gunicorn workers, each with its own memory cache; alone, N
workers would make up to N upstream calls per id per TTL, and `ccproxy warm` would fill only
the worker that took each request. `BoxStore` puts a SQLite database (WAL mode, in `/dev/shm`
by default: memory, not disk) behind each worker's memory store:

- **per process**: the memory store in front. A fresh entry there is a hit with no SQLite
  call at all, so the hit path costs what it did.
- **per box**: the SQLite file. A worker that misses in memory reads it (and keeps a copy);
  entries carry `time.monotonic()` times, one clock for every process of the machine, so a
  copy expires in every worker at the same moment (a file whose times come from another
  boot is emptied when opened: `_of_this_boot`). One row per key in `flights` is the
  single-flight claim across processes: the worker holding it calls the upstream, the others
  poll for the entry (`AnswerCache._await_shared`). A claim names its process and has a
  deadline: a claim of a dead process, or past its deadline, is taken over.
- **per deployment**: Redis (`CCPROXY_REDIS_URL`) replaces this store altogether.

gevent: SQLite calls run in the worker's own thread, not a thread pool. Each is one short
statement (or one short transaction) on a memory file system: tens of microseconds, about
what a hop to a pool thread and back costs by itself (bench/box_cache.py), and the JSON work
around it holds the GIL either way. None waits for a lock inside SQLite (busy timeout 0):
a busy database is retried after a cooperative `time.sleep` (a gevent yield), a few times,
then given up for that call. No transaction spans a yield.

Failure never reaches the send path: a store that cannot be opened, read or written (full,
read-only, removed) is counted by reason in `degraded`, logged once, and left alone for a
few seconds; meanwhile each worker caches in its own memory and single-flight is per process,
as without the box cache.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # `ccproxy serve`'s master imports this module: nothing that loads urllib3
    from .cache import Entry, MemoryStore, Timer

log = logging.getLogger("ccproxy.box_cache")
T = TypeVar("T")

RETRY_AFTER_FAILURE = 5.0  # seconds the box is left alone after it failed
BUSY_TRIES = 8  # a writer holds the database for microseconds: a few short yields suffice
PURGE_EVERY = 1.0  # seconds between purges of expired rows (per process)
PURGE_BATCH = 500  # rows per purge statement: one statement must stay short (gevent)

# `fresh`: when the entry stops being a hit (`expires` adds the stale window). Writing an
# entry ends every claim on its key (the trigger): whoever waits for the key now finds it,
# and a miss costs one statement for its lookup, one for its claim and one for its entry.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, fresh REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires);
CREATE TABLE IF NOT EXISTS flights (
  key TEXT PRIMARY KEY, token TEXT NOT NULL, pid INTEGER NOT NULL, until REAL NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS entry_ends_claims AFTER INSERT ON entries
  BEGIN DELETE FROM flights WHERE key = NEW.key; END;
CREATE TABLE IF NOT EXISTS limits (
  upstream TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL, paused_until REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clock (
  id INTEGER PRIMARY KEY CHECK (id = 1), monotonic REAL NOT NULL, wall REAL NOT NULL);
"""
# Seconds two readings of (time.monotonic(), time.time()) may disagree by and still be one boot:
# NTP slews the wall clock by far less; a step beyond it only empties the cache once.
SAME_BOOT_SLACK = 60.0

_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _reason(exc: BaseException) -> str:
    """A metric label for why the box could not be used."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED") or name.startswith("SQLITE_BUSY_"):
        return "busy"
    if name == "SQLITE_FULL":
        return "full"
    if name.startswith("SQLITE_READONLY"):
        return "read_only"
    if name.startswith("SQLITE_CANTOPEN") or isinstance(exc, OSError):
        return "unavailable"
    return "error"


def prepare(path: str) -> None:
    """Start the file afresh (an earlier run's monotonic times mean nothing after a reboot):
    remove it and its WAL, create the schema, turn WAL mode on. Called by `ccproxy serve`'s
    master before it forks; a failure is logged and the workers run degraded."""
    for suffix in _SIDE_FILES:
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    old = os.umask(0o077)  # customer data: readable by the proxy's user only
    try:
        conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            _of_this_boot(conn)
        finally:
            conn.close()
    finally:
        os.umask(old)


def _same_boot(monotonic: float, wall: float) -> bool:
    return abs((time.time() - wall) - (time.monotonic() - monotonic)) <= SAME_BOOT_SLACK


def _of_this_boot(conn: sqlite3.Connection) -> None:
    """Empty a file whose times come from another boot's clock.

    Rows carry `time.monotonic()` times, which restart at each boot. `ccproxy serve` starts its
    file afresh, but a path you name and use without it (your own server, `create_app`) can
    outlive a reboot: its entries would then look fresh for as long as the last boot had run,
    and an upstream's pause would last as long. The file records one reading of both clocks;
    one that does not match this process's clocks (or none: a new file, or one written before
    the record existed) empties the entries, claims and limits, once, under a write lock."""
    row = conn.execute("SELECT monotonic, wall FROM clock").fetchone()
    if row is not None and _same_boot(*row):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT monotonic, wall FROM clock").fetchone()
        if row is None or not _same_boot(*row):  # not already done by another process
            for table in ("entries", "flights", "limits"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT OR REPLACE INTO clock VALUES (1, ?, ?)", (time.monotonic(), time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def remove(path: str) -> None:
    for suffix in _SIDE_FILES:
        try:
            os.unlink(path + suffix)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BoxStore:
    """A worker's memory store in front of the box's SQLite store (see the module docstring)."""

    name = "box"

    def __init__(self, path: str, local: MemoryStore, timer: Timer = time.monotonic,
                 maxsize: int = 100_000, lock_ttl: float = 2.0):
        from .entry_codec import decode_entry, encode_entry

        self._encode, self._decode = encode_entry, decode_entry
        self.path = path
        self.local = local
        self.timer = timer
        self.maxsize = maxsize
        self.lock_ttl = lock_ttl
        self.counts = {"HIT": 0, "MISS": 0}  # memory misses answered (or not) by the box
        self.degraded: dict[str, int] = {}
        self.last_error = ""
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()  # one statement at a time on this process's connection
        self._reads_off_until = 0.0
        self._writes_off_until = 0.0
        self._next_purge = 0.0
        self._held: dict[str, str] = {}  # key -> claim token, released with the entry's write

    # The Store protocol -------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        entry = self.local.get(key)
        if entry is not None and self.timer() - entry.stored_at < entry.ttl:
            return entry
        shared = self._read(key)
        if shared is not None and (entry is None or shared.stored_at > entry.stored_at):
            self.counts["HIT"] += 1
            self.local.put(key, shared)
            return shared
        self.counts["MISS"] += 1
        return entry

    def put(self, key: str, entry: Entry) -> None:
        if entry.ttl <= 0:
            return
        self.local.put(key, entry)
        token = self._held.pop(key, None)
        row = (key, self._encode(entry), entry.stored_at + entry.ttl, entry.stored_at + entry.ttl + entry.keep)
        # One statement, so one transaction: the entry, and (trigger) the end of the key's claims.
        written = self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO entries (key, value, fresh, expires) VALUES (?, ?, ?, ?)", row), None)
        if written is None and token is not None:
            self._held[key] = token  # not released with the entry: `unlock` tries again
        self._purge_now_and_then()

    def __len__(self) -> int:
        return len(self.local)

    # Single-flight across the box's processes --------------------------------------------

    def try_lock(self, key: str) -> str | None:
        """A token when this process may call the upstream for `key`; None when another live
        process holds the claim or a fresh entry appeared meanwhile (then await it). When the
        box cannot be written, a token: the call goes ahead, coalesced per process only."""
        token = uuid.uuid4().hex
        now, pid = self.timer(), os.getpid()

        def claim(conn: sqlite3.Connection) -> bool:
            # No claim while a fresh entry exists: one the last holder stored between our
            # memory miss and now needs no second call.
            taken = conn.execute(
                "INSERT INTO flights (key, token, pid, until) SELECT ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM entries WHERE key = ? AND fresh > ?) "
                "ON CONFLICT (key) DO UPDATE SET token = excluded.token, pid = excluded.pid, "
                "until = excluded.until WHERE flights.until <= ?",
                (key, token, pid, now + self.lock_ttl, key, now, now)).rowcount == 1
            if taken:
                return True
            row = conn.execute("SELECT pid FROM flights WHERE key = ?", (key,)).fetchone()
            if row is None or _alive(row[0]):
                return False  # a fresh entry, or a live holder
            # Its holder died (a crashed worker): take the claim over now, not at its deadline.
            return conn.execute("UPDATE flights SET token = ?, pid = ?, until = ? WHERE key = ? AND pid = ?",
                                (token, pid, now + self.lock_ttl, key, row[0])).rowcount == 1

        taken = self._write(claim, None)
        if taken is None:  # the box is unusable: lead without it
            return token
        if not taken:
            return None
        self._held[key] = token
        return token

    def unlock(self, key: str, token: str) -> None:
        if self._held.get(key) != token:
            return  # released by the entry's own write
        del self._held[key]
        self._write(lambda conn: conn.execute("DELETE FROM flights WHERE key = ? AND token = ?",
                                              (key, token)), None)

    # State for /readyz and /metrics ------------------------------------------------------

    @property
    def usable(self) -> bool:
        now = time.monotonic()
        return now >= self._reads_off_until and now >= self._writes_off_until

    def probe(self) -> bool:
        """Try the store now (a read of microseconds), unless a failure left it alone for a while:
        `usable` otherwise only knows what this worker's own lookups found."""
        if self.usable:
            self._run(lambda conn: conn.execute("SELECT 1 FROM entries LIMIT 1").fetchall(), None,
                      writing=False)
        return self.usable

    def state(self) -> dict[str, Any]:
        return {"path": self.path, "usable": self.usable, "last_error": self.last_error,
                "degraded": dict(self.degraded)}

    # The box file for other per-box state (box_limiter.py) -------------------------------

    def run_write(self, action: Callable[[sqlite3.Connection], T], default: T) -> T:
        """`action` (one short statement, or one short transaction) on the box file, as the
        cache's own writes run; `default` when the box cannot be written now."""
        return self._write(action, default)

    def run_read(self, action: Callable[[sqlite3.Connection], T], default: T) -> T:
        """A read on the box file; `default` when it cannot be read now."""
        if time.monotonic() < self._reads_off_until:
            return default
        return self._run(action, default, writing=False)

    # SQLite, briefly ---------------------------------------------------------------------

    def _read(self, key: str) -> Entry | None:
        if time.monotonic() < self._reads_off_until:
            self._count("skipped")
            return None
        row = self._run(lambda conn: conn.execute("SELECT value, expires FROM entries WHERE key = ?",
                                                  (key,)).fetchone(), None, writing=False)
        if row is None or row[1] <= self.timer():
            return None
        return self._decode(row[0])

    def _write(self, action: Callable[[sqlite3.Connection], T], default: T) -> T:
        if time.monotonic() < self._writes_off_until:
            self._count("skipped")
            return default
        return self._run(action, default, writing=True)

    def _run(self, action: Callable[[sqlite3.Connection], T], default: T, writing: bool) -> T:
        try:
            for attempt in range(BUSY_TRIES):
                with self._lock:
                    try:
                        result = action(self._connection())
                        if writing and self.last_error:  # a write proves the whole store usable
                            log.warning("box cache %s usable again", self.path)
                            self.last_error = ""
                        return result
                    except sqlite3.OperationalError as exc:
                        if _reason(exc) != "busy":
                            raise
                time.sleep(0.0005 * (attempt + 1))  # another process writes: yield, then again
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc, writing)
            return default
        self._count("busy")  # contention, not a broken store: the next call tries again
        return default

    def _connection(self) -> sqlite3.Connection:
        # Opened in the process that uses it: a connection must not cross gunicorn's fork.
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA synchronous=OFF")  # a cache in memory: nothing to make durable
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                _of_this_boot(conn)
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _failed(self, exc: BaseException, writing: bool) -> None:
        reason = _reason(exc)
        self._count(reason)
        now = time.monotonic()
        if self.last_error != reason:  # once per episode, not once per call
            log.warning("box cache %s unusable (%s: %s); caching per worker for now",
                        self.path, reason, exc)
        self.last_error = reason
        self._writes_off_until = now + RETRY_AFTER_FAILURE
        if not writing:
            self._reads_off_until = now + RETRY_AFTER_FAILURE
        if self._conn is not None and reason in ("unavailable", "error"):
            self._conn.close()
            self._conn = None

    def _count(self, reason: str) -> None:
        self.degraded[reason] = self.degraded.get(reason, 0) + 1

    def _purge_now_and_then(self) -> None:
        """Drop expired rows, then the soonest to expire past `maxsize` (bounded statements)."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        clock = self.timer()

        def purge(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries WHERE expires <= ? "
                         "LIMIT ?)", (clock, PURGE_BATCH))
            conn.execute("DELETE FROM flights WHERE until <= ?", (clock - self.lock_ttl,))
            over = conn.execute("SELECT count(*) FROM entries").fetchone()[0] - self.maxsize
            if over > 0:
                conn.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY expires "
                             "LIMIT ?)", (min(over, PURGE_BATCH),))

        self._write(purge, None)
