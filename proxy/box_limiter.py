"""One rate limit and one Retry-After pause per upstream for every worker of one machine.

Without it each worker has 1/N of the limit (`guards.RateLimiter`, per process). The kernel,
not the proxy, decides which worker accepts a connection, and a send is often served by a
few kept-alive connections: one worker can spend its share and answer "budget spent" (a
fallback, or a 503) while the others' shares lie unused; and an upstream's 429 paused only
the worker that received it, so the others kept calling into it. Here the box's whole limit
is one token bucket, and a pause one row, in the box cache's SQLite file (`box_cache.py`):

- **per box**: the bucket and the pause (`limits` table), the same arithmetic as
  `guards.RateLimiter` (a burst of a sixth of the limit, never more than the limit in any
  minute), on `time.monotonic()`, one clock for every process of the machine;
- **per process**: a copy of any pause seen (no SQLite call until it ends) and the fallback:
  while the box file cannot be written, this worker's own 1/N share, as before;
- **per deployment**: Redis (`redis_backend.RedisRateLimiter`) replaces this.

An upstream call costs one statement (take a token, or see why not: a second one, only when
refused; an upstream without a limit: one read, for a pause), so a cache miss pays it and a
hit, which makes no upstream call, does not.
"""

from __future__ import annotations

import math
import sqlite3

from .box_cache import BoxStore
from .errors import UpstreamRateLimited
from .guards import RateLimiter, paused_error

# Take one token from the upstream's bucket, refilled for the time since its last use, unless
# it is paused or holds less than one; the first call creates the bucket full, less its token.
# `updated` never moves back: a process that read the clock just before another one took a
# token must not be credited that interval a second time.
_TAKE = """
INSERT INTO limits (upstream, tokens, updated, paused_until) VALUES (:upstream, :capacity - 1, :now, 0)
ON CONFLICT (upstream) DO UPDATE SET
  tokens = min(:capacity, tokens + max(0, :now - updated) * :refill) - 1, updated = max(updated, :now)
WHERE paused_until <= :now AND min(:capacity, tokens + max(0, :now - updated) * :refill) >= 1
"""
# Lengthen a pause, never shorten it (two 429s with different Retry-After: the later end wins).
_PAUSE = """
INSERT INTO limits (upstream, tokens, updated, paused_until) VALUES (:upstream, :capacity, :now, :until)
ON CONFLICT (upstream) DO UPDATE SET paused_until = max(paused_until, :until)
RETURNING paused_until
"""


class BoxRateLimiter:
    """The box-wide limit (`per_minute`, 0: none) and pause of one upstream (see the module
    docstring); `local` is this process's share, used while the box file cannot be written."""

    def __init__(self, upstream: str, per_minute: float, box: BoxStore, local: RateLimiter):
        self.upstream = upstream
        self.per_minute = per_minute
        # The bucket's shape is guards.RateLimiter's, for the whole box's limit.
        self.capacity = max(1.0, per_minute / 6) if per_minute > 0 else 0.0
        self.refill = (per_minute - self.capacity) / 60 if per_minute > 0 else 0.0
        self.box = box
        self.local = local
        self.rejected = 0

    def acquire(self) -> None:
        """Return when a call may be made now; else raise UpstreamRateLimited with the wait."""
        try:
            self._acquire()
        except UpstreamRateLimited:
            self.rejected += 1
            raise

    def _acquire(self) -> None:
        if self.local.paused_for() > 0:
            self.local.acquire()  # raises the pause's error, with no SQLite call
        if self.per_minute <= 0:  # no limit: only a pause another worker saw can refuse
            paused_until, now = self._box_paused_until(), self.box.timer()
            if paused_until is not None and paused_until > now:
                self._refuse_paused(paused_until - now)
            return

        def take(conn: sqlite3.Connection) -> tuple[bool, float, float]:
            """(taken, tokens left, paused until), at the time of this try (a busy file is tried
            again after a yield)."""
            now = self.box.timer()
            params = {"upstream": self.upstream, "now": now, "capacity": self.capacity, "refill": self.refill}
            if conn.execute(_TAKE, params).rowcount == 1:
                return True, 0.0, 0.0
            row = conn.execute("SELECT tokens, updated, paused_until FROM limits WHERE upstream = ?",
                               (self.upstream,)).fetchone()
            if row is None:  # gone between the two statements (nothing deletes rows): refuse briefly
                return False, 0.0, 0.0
            tokens, updated, paused_until = row
            return False, min(self.capacity, tokens + max(0.0, now - updated) * self.refill), paused_until

        outcome = self.box.run_write(take, None)
        if outcome is None:
            if not self.box.usable:  # the file cannot be written: this process's share, as before
                self.local.acquire()
                return
            # Busy past its retries (contention, not failure): the local share would come on top
            # of the box's budget, so refuse this call; the next one asks the box again.
            raise UpstreamRateLimited(self.upstream, f"the proxy's {self.upstream} call budget is busy; "
                                      "try again later", retry_after=1)
        taken, tokens, paused_until = outcome
        if taken:
            return
        now = self.box.timer()
        if paused_until > now:
            self._refuse_paused(paused_until - now)
        wait = (1 - tokens) / self.refill if self.refill > 0 else 60
        raise UpstreamRateLimited(
            self.upstream, f"the proxy's {self.upstream} call budget is spent; try again later",
            retry_after=max(1, math.ceil(wait)),
        )

    def _refuse_paused(self, seconds: float) -> None:
        self.local.pause(seconds)  # remembered here: no SQLite call until it ends
        raise paused_error(self.upstream, seconds)

    def pause(self, seconds: float) -> None:
        self.local.pause(seconds)
        now = self.box.timer()
        row = self.box.run_write(lambda conn: conn.execute(_PAUSE, {
            "upstream": self.upstream, "now": now, "until": now + seconds, "capacity": self.capacity,
        }).fetchone(), None)
        if row is not None and row[0] > now + seconds:  # a longer pause another worker saw
            self.local.pause(row[0] - now)

    def paused_for(self) -> float:
        return self.local.paused_for()

    @property
    def state(self) -> dict:
        paused_until = self._box_paused_until() or 0.0
        paused_for = max(self.local.paused_for(), paused_until - self.box.timer())
        return {"per_minute": self.per_minute, "shared": True, "scope": "box", "rejected": self.rejected,
                "paused": paused_for > 0, "paused_for": math.ceil(max(0.0, paused_for))}

    def _box_paused_until(self) -> float | None:
        row = self.box.run_read(lambda conn: conn.execute(
            "SELECT paused_until FROM limits WHERE upstream = ?", (self.upstream,)).fetchone(), None)
        return float(row[0]) if row else None
