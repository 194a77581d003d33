"""Shared cache and rate limits on Redis, for deployments that outgrow one process or machine.

Same semantics as the in-memory store (TTL, grace, negative TTL); coalescing across
processes through a short `SET NX PX` lock; rate limits through one atomic Lua token
bucket per upstream. Values are JSON, never pickle: a compromised Redis must not be able
to run code in the proxy. If Redis goes away the proxy keeps answering from upstream and
process memory, logs it, and reports it on /readyz; it tries Redis again after a pause.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from .cache import Entry, MemoryStore
from .entry_codec import decode_entry as _decode
from .entry_codec import encode_entry as _encode
from .errors import UpstreamRateLimited
from .guards import RateLimiter, paused_error

log = logging.getLogger("ccproxy.redis")
PREFIX = "ccproxy:"
RETRY_AFTER_FAILURE = 5.0  # seconds before trying Redis again


class RedisHealth:
    """Whether Redis answered lately; shared by the store and the limiters of one process."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.down_since: float | None = None
        self.last_error = ""
        self._lock = threading.Lock()

    def usable(self) -> bool:
        with self._lock:
            return self.down_since is None or time.monotonic() - self.down_since >= RETRY_AFTER_FAILURE

    def failed(self, exc: Exception) -> None:
        with self._lock:
            if self.down_since is None:
                log.warning("redis unreachable (%s); serving from memory and upstream", type(exc).__name__)
            self.down_since = time.monotonic()
            self.last_error = type(exc).__name__

    def ok(self) -> None:
        with self._lock:
            if self.down_since is not None:
                log.warning("redis reachable again; shared cache resumed")
            self.down_since = None

    def ping(self) -> bool:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self.failed(exc)
            return False
        self.ok()
        return True

    def run(self, action: Callable[[], Any], default: Any = None) -> Any:
        """Run a Redis call; on failure note it and answer `default`."""
        if not self.usable():
            return default
        try:
            result = action()
        except redis.RedisError as exc:
            self.failed(exc)
            return default
        self.ok()
        return result


class RedisStore:
    """Answer entries in Redis with a memory store behind it for when Redis is away.

    Entries carry wall-clock times (`time.time`), which every instance shares.
    """

    name = "redis"

    def __init__(self, health: RedisHealth, fallback: MemoryStore, lock_ttl: float = 2.0,
                 timer: Callable[[], float] = time.time):
        self.health = health
        self.client = health.client
        self.fallback = fallback
        self.lock_ttl = lock_ttl
        self.timer = timer  # the entries' clock (wall-clock: shared by every instance)

    def get(self, key: str) -> Entry | None:
        raw = self.health.run(lambda: self.client.get(PREFIX + key), default=False)
        if raw is False:  # Redis unusable
            return self.fallback.get(key)
        return _decode(raw) if raw else None

    def put(self, key: str, entry: Entry) -> None:
        if entry.ttl <= 0:
            return
        millis = max(1, int((entry.ttl + entry.keep) * 1000))
        stored = self.health.run(lambda: self.client.set(PREFIX + key, _encode(entry), px=millis), False)
        if stored is False:
            self.fallback.put(key, entry)

    def try_lock(self, key: str) -> str | None:
        """A token when this process may call the upstream for `key` (or Redis is away)."""
        token = uuid.uuid4().hex
        got = self.health.run(
            lambda: self.client.set(PREFIX + "lock:" + key, token, nx=True, px=int(self.lock_ttl * 1000)),
            default="down",
        )
        if got == "down":
            return token
        if not got:
            return None
        # Stored by the last holder between our miss and our lock (its whole upstream call can
        # fit in that gap on a busy machine): no second call; the caller reads the entry.
        entry = self.get(key)
        if entry is not None and self.timer() - entry.stored_at < entry.ttl:
            self.unlock(key, token)
            return None
        return token

    def unlock(self, key: str, token: str) -> None:
        # Delete only our own lock (it may have expired and been taken by another process).
        script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
        self.health.run(lambda: self.client.eval(script, 1, PREFIX + "lock:" + key, token))

    def __len__(self) -> int:
        count = self.health.run(lambda: self.client.dbsize(), default=None)
        return int(count) if count is not None else len(self.fallback)


# KEYS[1] the bucket, KEYS[2] the upstream's pause (a key that expires when the pause ends).
# Answers {allowed, seconds to wait, whether the wait is the upstream's pause}.
# The time is Redis's own (TIME): callers on several machines have clocks apart, and a bucket
# whose time moved back and forth would credit the same interval again and again (100 ms of
# skew let 3,099 calls through a 600/min limit). Never back either (a failover's clock).
_ACQUIRE = """
redis.replicate_commands()  -- TIME before a write: effects replication (the default from Redis 5)
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {0, tostring(pause / 1000), 1} end
local capacity = tonumber(ARGV[1])
if capacity <= 0 then return {1, '0', 0} end
local refill = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local data = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(data[1]) or capacity
local ts = tonumber(data[2]) or now
if now < ts then now = ts end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * refill)
local ok = 0
if tokens >= 1 then tokens = tokens - 1 ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
if ok == 1 then return {1, '0', 0} end
return {0, tostring((1 - tokens) / refill), 0}
"""

# Lengthen a pause, never shorten it (two 429s with different Retry-After: the later end wins).
_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


class RedisRateLimiter:
    """The deployment-wide limit and Retry-After pause for one upstream, in Redis: one token
    bucket and one pause key shared by every process and instance, so a worker that never
    saw the upstream's 429 pauses too. The process-local limiter takes over while Redis is
    away (and holds a copy of any pause seen, so a paused process asks Redis no more)."""

    def __init__(self, upstream: str, per_minute: float, health: RedisHealth, local: RateLimiter):
        self.upstream = upstream
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute / 6) if per_minute > 0 else math.inf
        self.refill = (per_minute - self.capacity) / 60 if per_minute > 0 else math.inf
        self.health = health
        self.local = local
        self.key = f"{PREFIX}rate:{upstream}"
        self.pause_key = f"{PREFIX}pause:{upstream}"
        self.rejected = 0
        # EVALSHA, falling back to loading the script once: no script text on every call.
        self._acquire = health.client.register_script(_ACQUIRE)
        self._pause = health.client.register_script(_PAUSE)

    def acquire(self) -> None:
        if self.local.paused_for() > 0:
            self.rejected += 1
            self.local.acquire()  # raises the pause's error
        capacity = self.capacity if math.isfinite(self.capacity) else 0
        answer = self.health.run(
            lambda: self._acquire(keys=[self.key, self.pause_key],
                                  args=[capacity, self.refill if capacity else 0]),
            default=None,
        )
        if answer is None:
            self.local.acquire()
            return
        allowed, wait, paused = int(answer[0]), float(answer[1]), int(answer[2])
        if allowed:
            return
        self.rejected += 1
        if paused:
            self.local.pause(wait)  # remembered here: no Redis call until it ends
            raise paused_error(self.upstream, wait)
        raise UpstreamRateLimited(
            self.upstream, f"the proxy's {self.upstream} call budget is spent; try again later",
            retry_after=max(1, math.ceil(wait)),
        )

    def pause(self, seconds: float) -> None:
        self.local.pause(seconds)
        millis = max(1, int(seconds * 1000))
        self.health.run(lambda: self._pause(keys=[self.pause_key], args=[millis]))

    @property
    def state(self) -> dict:
        shared_ms = self.health.run(lambda: self.health.client.pttl(self.pause_key), default=None)
        paused_for = max(self.local.paused_for(), (shared_ms or 0) / 1000)
        return {"per_minute": self.per_minute, "shared": True, "rejected": self.rejected,
                "paused": paused_for > 0, "paused_for": math.ceil(paused_for)}

    def paused_for(self) -> float:
        return self.local.paused_for()
