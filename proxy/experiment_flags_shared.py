"""One Flags API fetch per refresh interval for the whole deployment (local experiment mode
with `CCPROXY_REDIS_URL`).

Every worker process still holds and refreshes its own parsed configuration (`FlagStore`), but
its refresh asks Redis first: a copy younger than `CCPROXY_EXPERIMENT_FLAG_REFRESH` is used as
it is (with the age of the fetch that made it, so `/readyz` and the max age stay truthful);
an older or absent one is fetched by the one process that takes a lock (`SET NX` with a TTL
longer than a fetch may take, so a process that dies holding it delays the others by that
TTL at most) and published for the others, who wait for it in their background refresh (never
on the send path). The copy expires from Redis at `CCPROXY_EXPERIMENT_FLAG_MAX_AGE`. When Redis
is unreachable each process fetches for itself, as without Redis.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .config import credential_id

PREFIX = "ccproxy:experiment-flags:"
POLL = 0.1  # seconds between looks at Redis while another process fetches


class SharedFlagFetch:
    """A `FlagStore` fetch: `() -> (raw flag configurations, when they were fetched)`."""

    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], health: Any, deployment_key: str,
                 refresh: float, max_age: float, lock_ttl: float,
                 timer: Callable[[], float] = time.time):
        self._fetch = fetch
        self._health = health  # redis_backend.RedisHealth
        self._key = PREFIX + credential_id(deployment_key)  # never the key in clear
        self._refresh = refresh
        self._max_age = max_age
        self._lock_ttl = lock_ttl
        self._timer = timer
        self._last: tuple[str, list[dict[str, Any]]] | None = None  # (digest, flags) last read
        self.fetched = 0  # Flags API calls this process made (the others came from Redis)

    def __call__(self) -> tuple[list[dict[str, Any]], float]:
        from redis.exceptions import LockError

        give_up = time.monotonic() + self._lock_ttl + 1
        while True:
            shared = self._health.run(self._read_meta, default=False)
            if shared is False:  # Redis unusable: fetch alone, as without Redis
                return self._fetch_alone()
            if shared is not None and self._timer() - shared[0] < self._refresh:
                flags = self._load(shared[1])
                if flags is not None:
                    return flags, shared[0]
            lock = self._health.client.lock(self._key + ":lock", timeout=self._lock_ttl)
            if self._health.run(partial(lock.acquire, blocking=False), default=False):
                try:
                    # Published by the last holder between our look and our lock? Use that.
                    shared = self._health.run(self._read_meta, default=None)
                    if shared is not None and self._timer() - shared[0] < self._refresh:
                        flags = self._load(shared[1])
                        if flags is not None:
                            return flags, shared[0]
                    return self._fetch_and_publish()
                finally:
                    try:
                        lock.release()
                    except LockError:
                        pass  # it expired: someone else may hold it now, which is fine
            if time.monotonic() > give_up:
                return self._fetch_alone()  # the holder neither published nor let go
            time.sleep(POLL)

    def _read_meta(self) -> tuple[float, str] | None:
        at, digest = self._health.client.hmget(self._key, "at", "sha")
        if at is None or digest is None:
            return None
        return float(at), digest.decode()

    def _load(self, digest: str) -> list[dict[str, Any]] | None:
        """The shared flags (the same list object as last time when unchanged: no decoding)."""
        if self._last is not None and self._last[0] == digest:
            return self._last[1]
        raw = self._health.run(lambda: self._health.client.hget(self._key, "flags"), default=None)
        if raw is None or hashlib.sha256(raw).hexdigest() != digest:
            return None  # replaced in between: look again
        flags = json.loads(raw)
        self._last = (digest, flags)
        return flags

    def _fetch_alone(self) -> tuple[list[dict[str, Any]], float]:
        self.fetched += 1
        return self._fetch(), self._timer()

    def _fetch_and_publish(self) -> tuple[list[dict[str, Any]], float]:
        flags, at = self._fetch_alone()
        raw = json.dumps(flags, separators=(",", ":")).encode()
        digest = hashlib.sha256(raw).hexdigest()

        def publish() -> None:
            pipe = self._health.client.pipeline(transaction=True)
            pipe.hset(self._key, mapping={"at": repr(at), "sha": digest, "flags": raw})
            pipe.pexpire(self._key, max(1, int(self._max_age * 1000)))
            pipe.execute()

        self._health.run(publish)
        self._last = (digest, flags)
        return flags, at
