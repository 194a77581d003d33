"""Upstream answer cache: TTL per entry, bounded, thread-safe, with request coalescing.

Routes never touch storage: they call `AnswerCache.fetch(key, load, ttl_of)`.
Storage is a small `Store` interface (get/put) so a shared backend (Redis)
can replace the in-memory one without changing callers; coalescing and
freshness policy live here, above the store.

Scope: `MemoryStore` and the in-flight calls coalesced here are per process. A store with
`try_lock`/`unlock` extends coalescing beyond the process: `box_cache.BoxStore` to every
worker of one machine, `redis_backend.RedisStore` to the whole deployment.

Freshness follows RFC 5861 and Varnish grace: an entry is fresh for its TTL; for
`grace` seconds after that it is served at once while one background refresh runs
(stale-while-revalidate); for `max_stale` seconds after its TTL it is served when
the upstream fails (stale-if-error). A failed load never replaces a stored entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TLRUCache

from .errors import TransientError, UpstreamTimeout
from .guards import remaining

Timer = Callable[[], float]
TtlOf = Callable[[Any], float]  # seconds an answer stays fresh, from the answer


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer: what it is, when it was stored, how long it is fresh."""

    value: Any
    stored_at: float
    ttl: float
    keep: float = 0.0  # seconds past the TTL it may still be served stale

    @property
    def expires(self) -> float:
        """When the store may drop it."""
        return self.stored_at + self.ttl + self.keep


@dataclass(frozen=True, slots=True)
class Lookup:
    """What `fetch` gives a route: the value and how it was obtained."""

    value: Any
    state: str  # HIT, MISS, STALE, COALESCED (waited for an identical in-flight call), FALLBACK
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
            maxsize=maxsize, ttu=lambda _key, entry, _now: entry.expires, timer=timer
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

    __slots__ = ("done", "value", "ttl", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.ttl = 0.0
        self.error: BaseException | None = None


class AnswerCache:
    """Fetch-through cache: fresh entries are served, misses load once per key."""

    def __init__(
        self,
        store: Store,
        timer: Timer = time.monotonic,
        coalesce_wait: float = 1.5,
        grace: float = 0.0,
        max_stale: float = 0.0,
    ):
        self.store = store
        self.timer = timer
        self.coalesce_wait = coalesce_wait
        self.grace = grace
        self.max_stale = max_stale
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._refreshes: list[threading.Thread] = []
        self.counts = {"HIT": 0, "MISS": 0, "STALE": 0, "COALESCED": 0, "REFRESH": 0}

    def fetch(self, key: str, load: Callable[[], Any], ttl_of: TtlOf) -> Lookup:
        """Serve `key` fresh, else stale within grace (refreshing in the background), else
        load it (once for concurrent callers), else serve it stale if the load failed."""
        now = self.timer()
        entry = self.store.get(key)
        if entry is not None:
            age = now - entry.stored_at
            if age < entry.ttl:
                return self._counted(Lookup(entry.value, "HIT", age, entry.ttl - age))
            if age < entry.ttl + self.grace:
                self._refresh_in_background(key, load, ttl_of)
                return self._counted(Lookup(entry.value, "STALE", age, 0.0))
        try:
            return self._counted(self._load_once(key, load, ttl_of))
        except TransientError:
            if entry is not None and self.timer() - entry.stored_at < entry.ttl + self.max_stale:
                return self._counted(Lookup(entry.value, "STALE", self.timer() - entry.stored_at, 0.0))
            raise

    def _counted(self, lookup: Lookup) -> Lookup:
        self.counts[lookup.state] += 1
        return lookup

    def _refresh_in_background(self, key: str, load: Callable[[], Any], ttl_of: TtlOf) -> None:
        """One refresh per key at a time; its failure leaves the stored entry as it was."""
        with self._flights_lock:
            if key in self._flights:
                return
        self.counts["REFRESH"] += 1

        def refresh() -> None:
            try:
                self._load_once(key, load, ttl_of)
            except Exception:  # logged by the client's error path; the old entry stays
                pass

        thread = threading.Thread(target=refresh, name="cache-refresh", daemon=True)
        self._refreshes = [t for t in self._refreshes if t.is_alive()] + [thread]
        thread.start()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait for background refreshes (tests, shutdown)."""
        for thread in list(self._refreshes):
            thread.join(timeout)

    def _load_once(self, key: str, load: Callable[[], Any], ttl_of: TtlOf) -> Lookup:
        """Load `key` once per process for concurrent callers (nginx proxy_cache_lock)."""
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            return self._wait(key, flight)
        try:
            lookup = self._lead(key, load, ttl_of)
            flight.value, flight.ttl = lookup.value, lookup.max_age
            return lookup
        except BaseException as exc:
            # Errors are never stored: the next caller tries the upstream again.
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _lead(self, key: str, load: Callable[[], Any], ttl_of: TtlOf) -> Lookup:
        # A shared store (the box cache, Redis) extends coalescing across processes with a claim.
        try_lock = getattr(self.store, "try_lock", None)
        if try_lock is None:
            # Stored by a load that ended between our lookup and our flight (a busy machine can
            # fit a whole upstream call in that gap): serve it. A claim checks this itself.
            entry = self.store.get(key)
            if entry is not None and self.timer() - entry.stored_at < entry.ttl:
                return self._coalesced(entry)
        token = try_lock(key) if try_lock else ""
        if token is None and try_lock is not None:
            shared, token = self._await_shared(key, try_lock)
            if shared is not None:
                return self._coalesced(shared)
            # The other process failed, died or is slow: call the upstream ourselves.
        try:
            value = load()
            ttl = ttl_of(value)
            self.store.put(key, Entry(value, self.timer(), ttl, max(self.grace, self.max_stale)))
            return Lookup(value, "MISS", 0.0, ttl)
        finally:
            if token:
                self.store.unlock(key, token)  # type: ignore[attr-defined]

    def _coalesced(self, entry: Entry) -> Lookup:
        """Another load's fresh entry, served to this caller."""
        age = self.timer() - entry.stored_at
        return Lookup(entry.value, "COALESCED", age, entry.ttl - age)

    def _await_shared(self, key: str, try_lock: Callable[[str], str | None],
                      poll: float = 0.01) -> tuple[Entry | None, str | None]:
        """Wait for another process's answer to appear in the shared store; or for its claim
        to go (it failed, or its process died) and take it: then (None, our token)."""
        until = self.timer() + max(0.0, min(self.coalesce_wait, remaining()))
        while self.timer() < until:
            time.sleep(poll)
            entry = self.store.get(key)
            if entry is not None and self.timer() - entry.stored_at < entry.ttl:
                return entry, None
            token = try_lock(key)
            if token is not None:
                return None, token
        return None, None

    def _wait(self, key: str, flight: _Flight) -> Lookup:
        # Bounded by the request's own deadline too: never wait past what Braze allows.
        if not flight.done.wait(max(0.0, min(self.coalesce_wait, remaining()))):
            raise UpstreamTimeout(key.split(":", 1)[0], "the upstream did not answer in time")
        if flight.error is not None:
            raise flight.error
        return Lookup(flight.value, "COALESCED", 0.0, flight.ttl)

    def __len__(self) -> int:
        return len(self.store)


def cache_key(upstream: str, credential: str, operation: str, params: dict[str, str]) -> str:
    """A stable string key: upstream, credential tag (never the secret), operation, sorted params.

    Parameters are joined with `&` and `=` and percent-encoded only where a value holds
    `%`, `&` or `=`, so keys stay readable and unambiguous at a fraction of urlencode's cost.
    """
    query = "&".join(f"{k}={_escape(v)}" for k, v in sorted(params.items()))
    return f"{upstream}:{credential}:{operation}?{query}"


def _escape(value: str) -> str:
    if "%" in value or "&" in value or "=" in value:
        return value.replace("%", "%25").replace("&", "%26").replace("=", "%3D")
    return value
