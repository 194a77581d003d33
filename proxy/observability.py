"""Metrics (Prometheus, via prometheus-client), JSON access logs and request ids.

Each app has its own metrics registry. Counters that other layers already keep (cache
states, breaker and limiter state) are copied into metrics at scrape time (and once a
second under `ccproxy serve`), so the cache and the guards need no metrics code.
With several gunicorn workers (`ccproxy serve`) the values live in files in one
directory (prometheus-client's multiprocess mode, see `metrics_dir`), so a scrape
answered by any worker sums them all; the `worker` label on the copied state says
whose it is. In-process apps (tests) keep their values in memory.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from .services import Services

REQUEST_ID_HEADER = "X-Request-Id"
# Accepted from callers as is; anything else (CR/LF, long strings) is replaced, so a request
# id can never split a header or a log line.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0)


def accept_request_id(raw: str | None) -> str:
    """The caller's X-Request-Id if it is safe, else a new random one (an id for matching
    log lines, not a secret: no need for the cost of os.urandom on every request)."""
    return raw if raw and _SAFE_ID.match(raw) else f"{random.getrandbits(128):032x}"


def set_request_id(value: str) -> contextvars.Token:
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


def current_request_id() -> str:
    return _request_id.get()


# Braze gives a Connected Content call 2 s; a slower answer is an abort, like a 5xx.
BRAZE_TIMEOUT = 2.0
# Routes Braze never calls (scrapes, probes, the preview page): not in its failure count.
OPERATOR_ROUTES = frozenset({"/metrics", "/healthz", "/readyz", "/openapi.json", "/preview",
                             "/v1/preview/render/<name>", "unmatched"})
_ANSWERS_COUNTED = {"STALE": "stale", "FALLBACK": "fallback"}


def braze_failure(status: int, seconds: float) -> str:
    """Why Braze would abort or retry this answer ("" when it would not): 5xx, 408 and 429
    count against the host, and so does any answer later than Braze's 2 s timeout. A 404
    or a 400 renders empty: not a failure by Braze's rule."""
    if status >= 500:
        return "5xx"
    if status in (408, 429):
        return str(status)
    return "slow" if seconds > BRAZE_TIMEOUT else ""


class Metrics:
    """The app's Prometheus metrics.

    Under `ccproxy serve` (PROMETHEUS_MULTIPROC_DIR set, see `metrics_dir`) every worker
    writes its values to files in one directory and a scrape sums them, so any worker
    answers for all. State other layers keep in memory (cache counts, breakers, limiters)
    is copied into metrics at scrape time and, in each worker, once a second."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.worker = str(os.getpid())
        self.services: Services | None = None  # what `watch` copies state from
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        registry = self.registry
        self.requests = Counter(
            "ccproxy_requests_total", "Requests answered, by route and status",
            ["route", "status"], registry=registry,
        )
        self.request_seconds = Histogram(
            "ccproxy_request_seconds", "Time to answer a request, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.braze_failures = Counter(
            "ccproxy_braze_failures_total",
            "Answers Braze aborts or retries (5xx, 408, 429, slower than 2 s), by route and reason",
            ["route", "reason"], registry=registry,
        )
        # Data endpoints called inside another request (templates, previews, consent links):
        # apart from ccproxy_requests_total, which counts only what a client (Braze) asked.
        self.inprocess_calls = Counter(
            "ccproxy_inprocess_calls", "Data endpoint calls made in process by another route, "
            "by endpoint, status and cache state", ["route", "status", "cache"], registry=registry,
        )
        self.degraded = Counter(
            "ccproxy_degraded_answers_total",
            "Answers served from a stale cache entry or the operator's fallback, by route and kind",
            ["route", "kind"], registry=registry,
        )
        self.upstream_calls = Counter(
            "ccproxy_upstream_calls_total",
            "Upstream calls by upstream and outcome (HTTP status, or the error code)",
            ["upstream", "outcome"], registry=registry,
        )
        self.upstream_seconds = Histogram(
            "ccproxy_upstream_seconds", "Upstream call latency by upstream",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        # Copied from the cache and guards (per process): see sync_state.
        self.cache_lookups = Counter(
            "ccproxy_cache_lookups", "Cache lookups by result (HIT, MISS, STALE, COALESCED, REFRESH)",
            ["result", "worker"], registry=registry,
        )
        self.cache_entries = Gauge("ccproxy_cache_entries", "Entries in the cache store", ["worker"],
                                   registry=registry, multiprocess_mode="livesum")
        self.breaker_open = Gauge(
            "ccproxy_breaker_open", "1 when the upstream's circuit is open or half open",
            ["upstream", "worker"], registry=registry, multiprocess_mode="livemax",
        )
        self.limiter_rejections = Counter(
            "ccproxy_limiter_rejections", "Calls refused by the proxy's own rate limiter",
            ["upstream", "worker"], registry=registry,
        )
        self.upstream_paused = Gauge(
            "ccproxy_upstream_paused", "1 while the upstream's own Retry-After pauses calls to it",
            ["upstream"], registry=registry, multiprocess_mode="livemax",
        )
        self.experiment_flags_age = Gauge(
            "ccproxy_experiment_flags_age_seconds",
            "Age of the oldest flag configuration a worker evaluates with (local mode; -1: none yet)",
            registry=registry, multiprocess_mode="livemax",
        )
        self.experiment_exposures = Counter(
            "ccproxy_experiment_exposures",
            "Local-mode exposure events by outcome: queued, duplicate (this process's 24 h window), "
            "shared_duplicate (Redis), dropped (queue full), sent, failed (Amplitude refused them), "
            "lost_at_exit", ["outcome", "worker"], registry=registry,
        )
        self.upstream_pauses = Counter(
            "ccproxy_upstream_pauses", "Pauses an upstream asked for (a 429, or a 503 with Retry-After)",
            ["upstream"], registry=registry,
        )
        self.outbox_dropped = Counter(
            "ccproxy_outbox_dropped", "Writes not recorded at intake, by reason", ["reason", "worker"],
            registry=registry,
        )
        # Inbound connections of `ccproxy serve` workers (proxy/connections.py): none in-process.
        self.connections_closed = Counter(
            "ccproxy_connections_closed", "Client connections the server closed, by reason "
            "(a clock that ran out: header/body/send/keepalive_timeout; shed_<phase> past the cap; shutdown)",
            ["reason"], registry=registry,
        )
        self.connections_handed_over = Counter(
            "ccproxy_connections_handed_over", "Times the fast lane handed a client connection to "
            "gunicorn's parser (it comes back to the lane after gunicorn's answer), by reason "
            "(not_plain_get: a request outside the lane's subset of HTTP/1.1; not_data_endpoint: any "
            "other route; incomplete: a hang-up or a clock mid-head)",
            ["reason"], registry=registry,
        )
        self.connections = Gauge(
            "ccproxy_connections", "Open client connections by phase (waiting, body, active, send, idle)",
            ["phase"], registry=registry, multiprocess_mode="livesum",
        )
        # The box cache (a SQLite file all workers share; see proxy/box_cache.py).
        self.box_lookups = Counter(
            "ccproxy_box_cache_lookups",
            "Memory misses of a worker answered from the box cache (HIT) or not (MISS)",
            ["result", "worker"], registry=registry,
        )
        self.box_degraded = Counter(
            "ccproxy_box_cache_degraded",
            "Box cache operations given up, by reason (full, read_only, unavailable, busy, error, "
            "skipped: left alone after a failure); the worker used its own memory cache instead",
            ["reason", "worker"], registry=registry,
        )
        self._copied: dict[tuple, float] = {}
        self._sync_lock = threading.Lock()
        if self.multiprocess_dir:
            # The registry above only names the metrics: their values live in the directory's files.
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry, path=self.multiprocess_dir)
        else:
            self.scrape_registry = registry
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def watch(self, services: Services) -> None:
        """Report `services`' state too: in-memory counts and states copied at scrape time
        (and once a second in each worker under `ccproxy serve`), the outbox file read."""
        self.services = services
        services.observe_call = self.observe_inprocess
        self.scrape_registry.register(_BoxCollector(services))
        if self.multiprocess_dir:
            threading.Thread(target=self._sync_forever, name="ccproxy-metrics", daemon=True).start()

    def observe_request(self, route: str, status: int, seconds: float, cache: str = "-") -> None:
        # Label lookups cost more than the increments: keep the children.
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (
                self.requests.labels(route, str(status)), self.request_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)
        if route in OPERATOR_ROUTES:
            return
        if status >= 500 or status in (408, 429) or seconds > BRAZE_TIMEOUT:
            self.braze_failures.labels(route, braze_failure(status, seconds)).inc()
        kind = _ANSWERS_COUNTED.get(cache)
        if kind is not None:
            self.degraded.labels(route, kind).inc()

    def observe_inprocess(self, route: str, status: int, cache: str) -> None:
        self.inprocess_calls.labels(route, str(status), cache).inc()

    def observe_upstream(self, upstream: str, outcome: str, seconds: float) -> None:
        self.upstream_calls.labels(upstream, outcome).inc()
        self.upstream_seconds.labels(upstream).observe(seconds)

    def sync_state(self) -> None:
        """Copy this process's in-memory counts and states into its metrics (counters by
        their increase since the last copy, so a sum over workers stays right)."""
        services, worker = self.services, self.worker
        if services is None:
            return
        with self._sync_lock:
            for state, count in list(services.cache.counts.items()):
                self._advance(self.cache_lookups.labels(state, worker), ("cache", state), count)
            self.cache_entries.labels(worker).set(len(services.cache))
            for client in services.clients:
                name = client.name
                self.breaker_open.labels(name, worker).set(0 if client.breaker.state == "closed" else 1)
                self._advance(self.limiter_rejections.labels(name, worker), ("limiter", name),
                              client.limiter.state.get("rejected", 0))
                self.upstream_paused.labels(name).set(1 if client.limiter.paused_for() > 0 else 0)
                self._advance(self.upstream_pauses.labels(name), ("pauses", name), client.pauses)
            flags = services._flag_store  # local Experiment mode, once used
            if flags is not None:
                age = flags.age()
                self.experiment_flags_age.set(-1 if age is None else age)
            exposures = services._exposures  # local mode with an analytics key
            if exposures is not None:
                for outcome, count in list(exposures.counts.items()):
                    self._advance(self.experiment_exposures.labels(outcome, worker),
                                  ("exposures", outcome), count)
            guard = services.connections  # set by the serve worker
            if guard is not None:
                for reason, count in list(guard.closed.items()):
                    self._advance(self.connections_closed.labels(reason), ("closed", reason), count)
                for reason, count in list(guard.handed_over.items()):
                    self._advance(self.connections_handed_over.labels(reason), ("handed", reason), count)
                for phase, count in guard.open_by_phase().items():
                    self.connections.labels(phase).set(count)
            box = services.box
            if box is not None:
                for result, count in list(box.counts.items()):
                    self._advance(self.box_lookups.labels(result, worker), ("box", result), count)
                for reason, count in list(box.degraded.items()):
                    self._advance(self.box_degraded.labels(reason, worker), ("box-degraded", reason), count)
            outbox = services._outbox
            if outbox is not None:
                for reason in ("outbox_full", "outbox_unwritable", "pixel_unsigned", "pixel_duplicate"):
                    self._advance(self.outbox_dropped.labels(reason, worker), ("dropped", reason),
                                  outbox.dropped.get(reason, 0))

    def _advance(self, counter: Any, key: tuple, total: float) -> None:
        done = self._copied.get(key, 0)
        if total > done:
            counter.inc(total - done)
        self._copied[key] = total

    def _sync_forever(self) -> None:
        while True:
            time.sleep(1.0)
            try:
                self.sync_state()
            except Exception:  # a metrics copy must never end the worker
                logging.getLogger("ccproxy").exception("copying state into metrics failed")

    def exposition(self) -> bytes:
        self.sync_state()
        return generate_latest(self.scrape_registry)


class _BoxCollector:
    """What every worker sees alike (the outbox file), read at scrape time."""

    def __init__(self, services: Services):
        self.services = services

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        yield from _outbox_metrics(self.services)


def _outbox_metrics(services: Services) -> Iterable:
    """Outbox depth and oldest age per lane and dead letters (the box's file, whichever
    worker answers)."""
    import sqlite3

    outbox = services._outbox
    if outbox is None:
        return
    try:
        lanes = outbox.lane_stats()
        dead = outbox.counts().get("dead", 0)
    except sqlite3.Error:
        return
    depth = GaugeMetricFamily("ccproxy_outbox_depth", "Undelivered writes by lane", labels=["lane"])
    oldest = GaugeMetricFamily("ccproxy_outbox_oldest_seconds", "Age of the oldest undelivered write by lane",
                               labels=["lane"])
    for lane, stats in lanes.items():
        depth.add_metric([lane], stats.depth)
        oldest.add_metric([lane], stats.oldest_age)
    yield depth
    yield oldest
    yield GaugeMetricFamily("ccproxy_outbox_dead_letters", "Writes mediarithmics refused, kept for an operator",
                            value=dead)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the proxy's loggers, at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("ccproxy", "ccproxy.redis", "ccproxy.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler] if name == "ccproxy" else []
        logger.setLevel(level.upper())
    logging.getLogger("ccproxy").propagate = False
