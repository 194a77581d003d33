"""What a request handler may use: the settings, the answer cache and one client per upstream
(each with its circuit breaker, rate limiter and retry budget), and operator fallbacks.

Built once per app by `create_app`; a test app gets fresh ones.
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .cache import AnswerCache, Lookup, MemoryStore, Timer, cache_key
from .clients.amplitude import AmplitudeClient
from .clients.base import Answer, HttpClient, Query, make_pool
from .clients.experiment import ExperimentClient, FlagConfigClient
from .clients.mediarithmics import MediarithmicsClient
from .clients.target import TargetClient
from .config import Settings, SettingsError
from .errors import OutboxUnavailable, ProxyError, TransientError
from .guards import CircuitBreaker, RateLimiter, RetryBudget

if TYPE_CHECKING:
    from .delivery import Deliverer
    from .experiment_local import FlagStore
    from .outbox import Outbox

log = logging.getLogger("ccproxy")


def load_fallbacks(path: str) -> dict[str, dict[str, Any]]:
    """Fallback content by endpoint path, from a TOML file (empty without one)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"CCPROXY_FALLBACKS_FILE {path} cannot be read: {exc}") from None
    return {path: dict(content) for path, content in data.items() if isinstance(content, dict)}


class Services:
    def __init__(self, settings: Settings, timer: Timer | None = None):
        self.settings = settings
        self.redis = None
        memory = MemoryStore(settings.cache_maxsize, timer or time.monotonic)
        store: Any = memory
        if settings.redis_url:
            from .redis_backend import RedisHealth, RedisStore, redis

            self.redis = RedisHealth(redis.Redis.from_url(
                settings.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25
            ))
            # Entries shared between machines carry wall-clock times.
            timer = timer or time.time
            memory = MemoryStore(settings.cache_maxsize, timer)
            store = RedisStore(self.redis, memory)
        self.timer = timer = timer or time.monotonic
        self.pool = make_pool(proxy=settings.upstream_proxy)
        http = {
            "connect_timeout": settings.upstream_connect_timeout,
            "read_timeout": settings.upstream_read_timeout,
            "max_bytes": settings.upstream_max_bytes,
        }
        self.cache = AnswerCache(
            store,
            timer,
            settings.coalesce_wait,
            grace=settings.cache_grace,
            max_stale=settings.cache_max_stale,
        )
        self.fallbacks = load_fallbacks(settings.fallbacks_file)
        self._outbox: Outbox | None = None
        self.deliverer: Deliverer | None = None
        self.amplitude = self._guarded(AmplitudeClient(
            self.pool, settings.amplitude_url, settings.amplitude_secret_key, **http
        ))
        self.experiment = self._guarded(ExperimentClient(
            self.pool, settings.experiment_base_url, settings.experiment_deployment_key, **http
        ))
        # Fetched in the background, never on the send path: a large deployment's configuration
        # may take longer and weigh more than a per-recipient answer.
        self.experiment_flags = self._guarded(FlagConfigClient(
            self.pool, settings.experiment_flags_base_url, settings.experiment_deployment_key,
            **{**http, "read_timeout": max(10.0, settings.upstream_read_timeout),
               "max_bytes": max(16_000_000, settings.upstream_max_bytes)},
        ))
        # Metrics are plugged into `clients` by the app; the flags client reports through them.
        self.experiment_flags.observe = lambda *call: self.experiment.observe(*call)
        self._flag_store: FlagStore | None = None
        self.target = self._guarded(TargetClient(
            self.pool, settings.target_base_url, settings.target_client_code,
            settings.target_token, **http
        ))
        self.mediarithmics = self._guarded(MediarithmicsClient(
            self.pool, settings.mediarithmics_url, settings.mediarithmics_token,
            settings.mediarithmics_datamart_id, **http
        ))

    def _guarded(self, client):
        client.breaker = CircuitBreaker(
            client.name, self.settings.breaker_threshold, self.settings.breaker_reset, self.timer
        )
        local = RateLimiter(client.name, self.settings.rate_limit(client.name), self.timer)
        client.limiter = local
        if self.redis is not None:
            from .redis_backend import RedisRateLimiter

            # Shared: the whole deployment's limit in one bucket, not split per process.
            deployment_limit = self.settings.rate_limit(client.name) * self.settings.workers
            client.limiter = RedisRateLimiter(client.name, deployment_limit, self.redis, local)
        client.retry_budget = RetryBudget(timer=self.timer)
        return client

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

            s = self.settings
            self._flag_store = FlagStore(self.experiment_flags.flags, s.experiment_flag_refresh,
                                         s.experiment_flag_max_age, self.timer)
        return self._flag_store

    def cached(self, query: Query, ttl: float, fallback: Mapping[str, Any] | None = None) -> Lookup:
        """One upstream read through the cache, keyed without any secret in clear; fresh for
        `ttl` seconds (not-found answers: CCPROXY_CACHE_TTL_NEGATIVE). When it fails and
        nothing stale is left, the operator's `fallback` content, as the client shapes it for
        this read, stands in (when the read has one)."""
        client = query.client
        key = cache_key(client.name, client.credential, query.operation, query.params)
        negative = self.settings.cache_ttl_negative
        try:
            return self.cache.fetch(key, query.send, lambda answer: negative if answer.missing else ttl)
        except TransientError:
            data = None if fallback is None else client.fallback(query, fallback)
            if data is None:
                raise
            return Lookup(Answer(data), "FALLBACK", 0.0, 0.0)

    @property
    def outbox(self):
        """The durable outbox of writes (opened on first use)."""
        if self._outbox is None:
            import sqlite3

            from .outbox import Outbox

            try:
                self._outbox = Outbox(self.settings.outbox_path, self.settings.outbox_max_attempts,
                                      self.settings.outbox_max_backoff,
                                      max_rows=self.settings.outbox_max_rows)
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
            outbox = self.outbox
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
        client = self._guarded(MediarithmicsClient(
            self.pool, s.mediarithmics_url, s.mediarithmics_token, s.mediarithmics_datamart_id,
            connect_timeout=s.upstream_connect_timeout, read_timeout=s.outbox_write_timeout,
            max_bytes=s.upstream_max_bytes,
        ))
        client.limiter = self.mediarithmics.limiter
        client.observe = self.mediarithmics.observe
        return client

    def stop_delivering(self) -> None:
        """Claim no more writes (shutting down); the deliveries in flight finish."""
        if self.deliverer is not None:
            self.deliverer.request_stop()

    def close(self) -> None:
        """Let deliveries in flight finish and be recorded (clean shutdown)."""
        if self.deliverer is not None:
            self.deliverer.stop()
            self.deliverer = None
        self.cache.drain()

    def fallback_content(self, path: str) -> dict[str, Any] | None:
        return self.fallbacks.get(path)
