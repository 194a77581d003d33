"""What a request handler may use: the settings, the answer cache and one client per upstream
(each built with its circuit breaker, rate limiter and retry budget), and operator fallbacks.

Built once per app by `create_app` (in each process); a test app gets fresh ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import urllib3

from .cache import AnswerCache, Lookup, MemoryStore, Store, Timer, cache_key
from .clients.amplitude import AmplitudeClient
from .clients.analytics import AnalyticsClient
from .clients.base import Answer, HttpClient, Observe, Query, make_pool
from .clients.experiment import ExperimentClient, FlagConfigClient
from .clients.mediarithmics import MediarithmicsClient
from .clients.target import TargetClient
from .config import RateLimited, Settings
from .errors import OutboxUnavailable, ProxyError, TransientError, UpstreamRateLimited
from .fallbacks import load_fallbacks
from .guards import CircuitBreaker, Guards, Limiter, RateLimiter, RetryBudget

if TYPE_CHECKING:
    from flask import Flask

    from .box_cache import BoxStore
    from .delivery import Deliverer
    from .endpoints import Registry
    from .experiment_local import FlagStore
    from .exposures import ExposureTracker
    from .outbox import Outbox
    from .redis_backend import RedisHealth

EXTENSION = "ccproxy"  # the app.extensions key of an app's Services

log = logging.getLogger("ccproxy")
OUTBOX_OPEN_WAIT = 2.0  # seconds a request waits for the outbox's schema (start-up waits longer)


def flight_deadline(settings: Settings) -> float:
    """How long a box single-flight claim holds: the longest a live holder's upstream call
    may take (every call is cut at connect + read timeout), so only a hung or dead
    holder loses it."""
    return settings.upstream_connect_timeout + settings.upstream_read_timeout + 0.5


def upstream_guards(settings: Settings, name: str, timer: Timer, redis: RedisHealth | None,
                    limit: RateLimited | None = None, box: BoxStore | None = None) -> Guards:
    """A new breaker, rate limiter and retry budget for one upstream (per process). The
    limiter and its Retry-After pauses are shared by the deployment on Redis, else by the
    machine's workers through the box cache's file (`box`), else per process (each worker
    1/N of the limit). `limit`: whose rate limit setting holds (None: not limited, as the
    Flags API and the analytics events, a few calls a minute)."""
    breaker = CircuitBreaker(name, settings.breaker_threshold, settings.breaker_reset, timer)
    local = RateLimiter(name, settings.rate_limit(limit) if limit else 0.0, timer)
    limiter: Limiter = local
    # The limit of every process sharing the limiter: the deployment's on Redis; on one box,
    # `ccproxy serve` sets `workers` to its own worker count, so it is the box's (the setting).
    shared_limit = settings.deployment_rate_limit(limit) if limit else 0.0
    if redis is not None:
        from .redis_backend import RedisRateLimiter

        limiter = RedisRateLimiter(name, shared_limit, redis, local)
    elif box is not None:
        from .box_limiter import BoxRateLimiter

        limiter = BoxRateLimiter(name, shared_limit, box, local)
    return Guards(breaker, limiter, RetryBudget(timer=timer))


@dataclass(eq=False)
class Services:
    """Built by `Services.build` (once per app, in each process)."""

    settings: Settings
    timer: Timer
    cache: AnswerCache
    pool: urllib3.PoolManager
    amplitude: AmplitudeClient
    experiment: ExperimentClient
    # Fetched in the background, never on the send path: a large deployment's configuration
    # may take longer and weigh more than a per-recipient answer.
    experiment_flags: FlagConfigClient
    target: TargetClient
    mediarithmics: MediarithmicsClient
    endpoints: Registry  # this app's data endpoints (endpoints.build_registry)
    fallbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    redis: RedisHealth | None = None
    box: BoxStore | None = None  # the machine's shared answer cache (box_cache.py)
    connections: Any = None  # the serve worker's connection guard (connections.py), for metrics
    observe: Observe | None = None  # each upstream call, for the metrics
    observe_call: Callable[[str, int, str], None] | None = None  # each in-process call (Metrics.watch)
    deliverer: Deliverer | None = None
    _outbox: Outbox | None = None
    _flag_store: FlagStore | None = None
    _exposures: ExposureTracker | None = None

    @classmethod
    def build(cls, settings: Settings, timer: Timer | None = None,
              observe: Observe | None = None, endpoints: Registry | None = None) -> Services:
        """The cache (in memory, or on Redis when CCPROXY_REDIS_URL is set), the upstream
        pool, each upstream's client with its guards, and the data endpoints (a new
        registry of them all unless given)."""
        from .endpoints import build_registry

        redis = None
        memory = MemoryStore(settings.cache_maxsize, timer or time.monotonic)
        store: Store = memory
        if settings.redis_url:
            from .redis_backend import RedisHealth, RedisStore
            from .redis_backend import redis as redis_module

            redis = RedisHealth(redis_module.Redis.from_url(
                settings.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25
            ))
            # Entries shared between machines carry wall-clock times.
            timer = timer or time.time
            memory = MemoryStore(settings.cache_maxsize, timer)
            store = RedisStore(redis, memory, timer=timer)
        clock: Timer = timer or time.monotonic
        box = None
        if not settings.redis_url and settings.box_cache and settings.box_cache_path:
            from .box_cache import BoxStore

            # Entries carry time.monotonic(): one clock for every process of the machine.
            box = BoxStore(settings.box_cache_path, memory, clock, settings.cache_maxsize,
                           lock_ttl=flight_deadline(settings))
            store = box
        pool = make_pool(proxy=settings.upstream_proxy)
        http: dict[str, Any] = {
            "connect_timeout": settings.upstream_connect_timeout,
            "read_timeout": settings.upstream_read_timeout,
            "max_bytes": settings.upstream_max_bytes,
            "observe": observe,
        }

        def guards(name: str, limit: RateLimited | None = None) -> Guards:
            return upstream_guards(settings, name, clock, redis, limit, box)

        return cls(
            settings=settings, timer=clock, pool=pool, redis=redis, box=box, observe=observe,
            cache=AnswerCache(store, clock, settings.coalesce_wait, grace=settings.cache_grace,
                              max_stale=settings.cache_max_stale),
            fallbacks=load_fallbacks(settings.fallbacks_file),
            endpoints=build_registry() if endpoints is None else endpoints,
            amplitude=AmplitudeClient(pool, settings.amplitude_url, settings.amplitude_secret_key,
                                      guards=guards(AmplitudeClient.name, "amplitude"), **http),
            experiment=ExperimentClient(pool, settings.experiment_base_url,
                                        settings.experiment_deployment_key,
                                        guards=guards(ExperimentClient.name, "experiment"), **http),
            experiment_flags=FlagConfigClient(
                pool, settings.experiment_flags_base_url, settings.experiment_deployment_key,
                guards=guards(FlagConfigClient.name),
                **{**http, "read_timeout": max(10.0, settings.upstream_read_timeout),
                   "max_bytes": max(16_000_000, settings.upstream_max_bytes)},
            ),
            target=TargetClient(pool, settings.target_base_url, settings.target_client_code,
                                settings.target_token, guards=guards(TargetClient.name, "target"), **http),
            mediarithmics=MediarithmicsClient(
                pool, settings.mediarithmics_url, settings.mediarithmics_token,
                settings.mediarithmics_datamart_id, guards=guards(MediarithmicsClient.name, "mediarithmics"), **http),
        )

    @property
    def clients(self) -> list[HttpClient]:
        return [self.amplitude, self.experiment, self.target, self.mediarithmics]

    @property
    def flag_store(self) -> FlagStore | None:
        """Local mode's flag configurations (this process's; None in remote mode)."""
        if self.settings.experiment_mode != "local":
            return None
        if self._flag_store is None:
            from .experiment_local import FlagStore

            s, client, timer = self.settings, self.experiment_flags, self.timer

            def fetch() -> tuple[list[dict], float]:  # each process alone
                return client.flags(), timer()

            if self.redis is not None:
                from .experiment_flags_shared import SharedFlagFetch

                # One fetch per interval for the deployment; the lock outlives a fetch's timeout.
                fetch = SharedFlagFetch(client.flags, self.redis,  # type: ignore[assignment]
                                        s.experiment_deployment_key, s.experiment_flag_refresh,
                                        s.experiment_flag_max_age, lock_ttl=sum(client.timeout) + 5,
                                        timer=timer)
            self._flag_store = FlagStore(fetch, s.experiment_flag_refresh, s.experiment_flag_max_age, timer)
        return self._flag_store

    @property
    def exposures(self) -> ExposureTracker | None:
        """Local mode's exposure events (this process's pipeline; None without an analytics key
        or in remote mode, where Amplitude tracks assignments itself)."""
        s = self.settings
        if s.experiment_mode != "local" or not s.amplitude_api_key:
            return None
        if self._exposures is None:
            from .exposures import ExposureTracker

            # Off the send path, like the flags: an answer may take longer than a recipient's.
            client = AnalyticsClient(
                self.pool, s.analytics_base_url, s.amplitude_api_key,
                guards=upstream_guards(s, AnalyticsClient.name, self.timer, self.redis, box=self.box),
                connect_timeout=s.upstream_connect_timeout,
                read_timeout=max(10.0, s.upstream_read_timeout), max_bytes=s.upstream_max_bytes,
                observe=self.observe,
            )
            self._exposures = ExposureTracker(client, s.amplitude_api_key, self.redis, self.timer)
        return self._exposures

    def cached(self, query: Query, ttl: float, fallback: Mapping[str, Any] | None = None,
               when_limited: bool = False) -> Lookup:
        """One upstream read through the cache, keyed without any secret in clear; fresh for
        `ttl` seconds (not-found answers: CCPROXY_CACHE_TTL_NEGATIVE). When it fails and
        nothing stale is left, the operator's `fallback` content, as the client shapes it for
        this read, stands in (when the read has one); when it is rate limited (a 429, a
        Retry-After pause, the proxy's own budget) and `when_limited`, the client's empty
        answer does."""
        client = query.client
        key = cache_key(client.name, client.credential, query.operation, query.params)
        negative = self.settings.cache_ttl_negative
        try:
            return self.cache.fetch(key, query.send, lambda answer: negative if answer.missing else ttl)
        except TransientError as exc:
            data = None if fallback is None else client.fallback(query, fallback)
            if data is None and when_limited and isinstance(exc, UpstreamRateLimited):
                data = client.fallback(query, {})
            if data is None:
                raise
            return Lookup(Answer(data), "FALLBACK", 0.0, 0.0)

    @property
    def outbox(self) -> Outbox:
        """The durable outbox of writes (opened on first use; a request waits briefly for it)."""
        return self.open_outbox(OUTBOX_OPEN_WAIT)

    def open_outbox(self, migrate_timeout: float) -> Outbox:
        """The outbox, opened (its schema migrated) now if it is not open yet. `ccproxy serve`
        opens it as each worker starts, waiting up to a minute for another worker's
        migration, so no request pays for it."""
        if self._outbox is None:
            import sqlite3

            from .outbox import Outbox

            try:
                self._outbox = Outbox(self.settings.outbox_path, self.settings.outbox_max_attempts,
                                      self.settings.outbox_max_backoff,
                                      max_rows=self.settings.outbox_max_rows,
                                      migrate_timeout=migrate_timeout)
            except (OSError, sqlite3.Error) as exc:
                log.error("outbox %s cannot be opened: %s", self.settings.outbox_path, exc)
                raise OutboxUnavailable("the outbox cannot be opened; nothing was recorded",
                                        retry_after=30) from None
        return self._outbox

    def start_delivery(self) -> None:
        """Deliver queued writes in the background (each process; leases keep them apart)."""
        if self.deliverer is not None or not self.settings.outbox_path:
            return
        if not all(value for _name, value in self.mediarithmics.required):
            return
        from .delivery import Deliverer

        try:
            outbox = self.open_outbox(60.0)
        except ProxyError:
            return  # logged; writes answer 503 and /readyz reports it
        client = self.delivery_client()
        s = self.settings
        self.deliverer = Deliverer(
            outbox, lambda w: client.write(w.method, w.path, w.query, w.body),
            concurrency=s.outbox_concurrency, retention=s.outbox_retention,
        ).start()

    def delivery_client(self) -> MediarithmicsClient:
        """The client deliveries use: off the send path, so it waits up to
        CCPROXY_OUTBOX_WRITE_TIMEOUT (a write cut off by a short timeout may have landed, and
        would be sent again); its own breaker, the reads' rate limiter (one upstream budget)."""
        s = self.settings
        own = upstream_guards(s, MediarithmicsClient.name, self.timer, self.redis, "mediarithmics")
        return MediarithmicsClient(
            self.pool, s.mediarithmics_url, s.mediarithmics_token, s.mediarithmics_datamart_id,
            guards=Guards(own.breaker, self.mediarithmics.limiter, own.retry_budget),
            connect_timeout=s.upstream_connect_timeout, read_timeout=s.outbox_write_timeout,
            max_bytes=s.upstream_max_bytes, observe=self.observe,
        )

    def stop_delivering(self) -> None:
        """Claim no more writes (shutting down); the deliveries in flight finish."""
        if self.deliverer is not None:
            self.deliverer.request_stop()

    def close(self) -> None:
        """Let deliveries in flight finish and be recorded (clean shutdown): as long as one
        may take (connect + CCPROXY_OUTBOX_WRITE_TIMEOUT) from when the stop was asked; then
        send the queued exposure events (best effort: the writes come first)."""
        if self.deliverer is not None:
            s = self.settings
            self.deliverer.stop(s.upstream_connect_timeout + s.outbox_write_timeout + 1.0)
            self.deliverer = None
        if self._exposures is not None:
            self._exposures.close()
        self.cache.drain()

    def fallback_content(self, path: str) -> dict[str, Any] | None:
        return self.fallbacks.get(path)


def of_app(app: Flask) -> Services:
    """The services an app was built with."""
    services = app.extensions[EXTENSION]
    assert isinstance(services, Services)
    return services
