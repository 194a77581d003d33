"""Metrics (Prometheus, via prometheus-client), JSON access logs and request ids.

Each app has its own metrics registry. Counters that other layers already keep (cache
states, breaker and limiter state) are read at scrape time by a collector, so the
cache and the guards need no metrics code. With several gunicorn workers each scrape
sees the worker that answered it (the `worker` label says which).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class Metrics:
    """The app's Prometheus metrics."""

    def __init__(self, services: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        self.worker = str(os.getpid())
        self.requests = Counter(
            "ccproxy_requests_total", "Requests answered, by route and status",
            ["route", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "ccproxy_request_seconds", "Time to answer a request, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.upstream_calls = Counter(
            "ccproxy_upstream_calls_total",
            "Upstream calls by upstream and outcome (HTTP status, or the error code)",
            ["upstream", "outcome"], registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "ccproxy_upstream_seconds", "Upstream call latency by upstream",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_StateCollector(services, self.worker))
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        # Label lookups cost more than the increments: keep the children.
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (
                self.requests.labels(route, str(status)), self.request_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def observe_upstream(self, upstream: str, outcome: str, seconds: float) -> None:
        self.upstream_calls.labels(upstream, outcome).inc()
        self.upstream_seconds.labels(upstream).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Reads cache counts and guard states at scrape time."""

    def __init__(self, services: Any, worker: str):
        self.services = services
        self.worker = worker

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        cache = CounterMetricFamily(
            "ccproxy_cache_lookups", "Cache lookups by result (HIT, MISS, STALE, COALESCED, REFRESH)",
            labels=["result", "worker"],
        )
        for state, count in self.services.cache.counts.items():
            cache.add_metric([state, self.worker], count)
        yield cache
        entries = GaugeMetricFamily("ccproxy_cache_entries", "Entries in the cache store", labels=["worker"])
        entries.add_metric([self.worker], len(self.services.cache))
        yield entries
        breaker = GaugeMetricFamily(
            "ccproxy_breaker_open", "1 when the upstream's circuit is open or half open",
            labels=["upstream", "worker"],
        )
        rejected = CounterMetricFamily(
            "ccproxy_limiter_rejections", "Calls refused by the proxy's own rate limiter",
            labels=["upstream", "worker"],
        )
        for client in self.services.clients:
            breaker.add_metric([client.name, self.worker], 0 if client.breaker.state == "closed" else 1)
            rejected.add_metric([client.name, self.worker], client.limiter.state.get("rejected", 0))
        yield breaker
        yield rejected
        yield from _outbox_metrics(self.services, self.worker)


def _outbox_metrics(services: Any, worker: str) -> Iterable:
    """Outbox depth and oldest age per lane, dead letters (the box's file, whichever worker
    answers), and writes refused at intake (per worker)."""
    import sqlite3

    outbox = getattr(services, "_outbox", None)
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
    dropped = CounterMetricFamily("ccproxy_outbox_dropped", "Writes not recorded at intake, by reason",
                                  labels=["reason", "worker"])
    for reason in ("outbox_full", "outbox_unwritable", "pixel_unsigned", "pixel_duplicate"):
        dropped.add_metric([reason, worker], outbox.dropped.get(reason, 0))
    yield dropped


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
