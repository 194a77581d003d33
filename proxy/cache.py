"""Upstream answer cache: TTL per entry, bounded, thread-safe, with request coalescing.

Routes never touch storage: they call `AnswerCache.fetch(key, load, ttl_of)`.
Storage is a small `Store` interface (get/put) so a shared backend (Redis)
can replace the in-memory one without changing callers; coalescing and
freshness policy live here, above the store.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol
from urllib.parse import urlencode

from cachetools import TLRUCache

from .errors import UpstreamTimeout

Timer = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: what it is, when it was stored, how long it is fresh."""

    value: Any
    stored_at: float
    ttl: float


@dataclass(frozen=True, slots=True)
class Lookup:
    """What `fetch` gives a route: the value and how it was obtained."""

    value: Any
    state: str  # HIT, MISS or COALESCED (waited for an identical in-flight call)
    age: float  # seconds since the upstream answered
    max_age: float  # seconds it stays fresh from now


class Store(Protocol):
    def get(self, key: str) -> Entry | None: ...

    def put(self, key: str, entry: Entry) -> None: ...

    def __len__(self) -> int: ...


class MemoryStore:
    """Process-local storage on cachetools' TLRUCache (a TTL per entry, LRU bound)."""

    def __init__(self, maxsize: int, timer: Timer = time.monotonic):
        self._data: TLRUCache = TLRUCache(
            maxsize=maxsize, ttu=lambda _key, entry, _now: entry.stored_at + entry.ttl, timer=timer
        )
        # cachetools containers are not thread-safe; reads reorder the LRU list.
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, entry: Entry) -> None:
        if entry.ttl <= 0:
            return
        with self._lock:
            self._data[key] = entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class _Flight:
    """An upstream call in progress that identical requests wait on."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class AnswerCache:
    """Fetch-through cache: fresh entries are served, misses load once per key."""

    def __init__(self, store: Store, timer: Timer = time.monotonic, coalesce_wait: float = 1.5):
        self.store = store
        self.timer = timer
        self.coalesce_wait = coalesce_wait
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()

    def fetch(self, key: str, load: Callable[[], Any], ttl_of: Callable[[Any], float]) -> Lookup:
        """Serve `key` from the store, or call `load` (once for concurrent callers) and store it."""
        now = self.timer()
        entry = self.store.get(key)
        if entry is not None and now - entry.stored_at < entry.ttl:
            return Lookup(entry.value, "HIT", now - entry.stored_at, entry.ttl - (now - entry.stored_at))

        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            return self._wait(key, flight)
        try:
            flight.value = load()
        except BaseException as exc:
            # Errors are never stored: the next caller tries the upstream again.
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.done.set()
        ttl = ttl_of(flight.value)
        self.store.put(key, Entry(flight.value, self.timer(), ttl))
        return Lookup(flight.value, "MISS", 0.0, ttl)

    def _wait(self, key: str, flight: _Flight) -> Lookup:
        if not flight.done.wait(self.coalesce_wait):
            raise UpstreamTimeout(key.split(":", 1)[0], "the upstream did not answer in time")
        if flight.error is not None:
            raise flight.error
        entry = self.store.get(key)
        ttl = entry.ttl if entry is not None else 0.0
        return Lookup(flight.value, "COALESCED", 0.0, ttl)

    def __len__(self) -> int:
        return len(self.store)


def cache_key(upstream: str, credential: str, operation: str, params: dict[str, str]) -> str:
    """A stable string key: upstream, credential tag (never the secret), operation, sorted params."""
    return f"{upstream}:{credential}:{operation}?{urlencode(sorted(params.items()))}"
