"""What `/readyz` answers: can this process answer cached data GETs, and what is degraded.

The answer is built by small checks, each filling its part of the report and naming what
is wrong as reasons `{"code", "component", "message"}` (codes are a contract, listed in the
README). A reason is *blocking* when this process cannot answer cached data GETs: only
then is the answer 503, so one failing upstream, a Redis outage or an unwritable outbox
never takes every instance out of a load balancer. Everything else is `degraded: true`
with HTTP 200, and 503 only with `?strict=true`. A check that fails unexpectedly is itself
a reason (`check_failed`), never a 500. Every check looks at this process (breakers
and the memory cache are per process; the rate limiters per box, per process with the box cache
off; the box cache, Redis and the outbox are shared).

To add a check: write `def check_x(services, report) -> list[Reason]` and append it to CHECKS.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ProxyError
from .outbox import filesystem_problem

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("ccproxy")


@dataclass(frozen=True)
class Reason:
    code: str
    component: str
    message: str
    blocking: bool = False  # this process cannot answer cached data GETs

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "component": self.component, "message": self.message}


Check = Callable[["Services", dict[str, Any]], list[Reason]]


def check_cache(services: Services, report: dict[str, Any]) -> list[Reason]:
    """The answer cache: memory always answers; Redis may be away (memory takes over)."""
    entries = len(services.cache)
    if services.redis is None:
        report["cache"] = {"backend": "memory", "reachable": True, "entries": entries}
        box = services.box
        if box is None:
            return []
        usable = box.probe()  # whichever worker answers: one that never used the store yet too
        report["cache"]["box"] = box.state()  # shared by the box's workers
        if usable:
            return []
        return [Reason("box_cache_unusable", "cache",
                       f"the box cache cannot be used ({box.last_error}); each worker caches on its own")]
    reachable = services.redis.ping()
    report["cache"] = {"backend": "redis", "reachable": reachable, "entries": entries}
    if reachable:
        return []
    return [Reason("cache_unreachable", "cache",
                   "Redis is unreachable; answering from process memory and the upstreams")]


def check_upstreams(services: Services, report: dict[str, Any]) -> list[Reason]:
    """Each upstream's configuration, breaker and limiter (pauses an upstream asked for)."""
    upstreams, reasons = {}, []
    for client in services.clients:
        configured = all(value for _name, value in client.required)
        breaker, limiter = client.breaker.state, client.limiter.state
        upstreams[client.name] = {"configured": configured, "breaker": breaker, "limiter": limiter}
        component = f"upstream:{client.name}"
        if breaker != "closed":
            reasons.append(Reason("breaker_open", component,
                                  f"{client.name}'s circuit breaker is {breaker.replace('_', '-')}"))
        if limiter.get("paused"):
            reasons.append(Reason("upstream_paused", component,
                                  f"{client.name} asked the proxy to wait (Retry-After); "
                                  f"{limiter.get('paused_for', 0)} s left"))
    report["upstreams"] = upstreams
    return reasons


def check_outbox(services: Services, report: dict[str, Any]) -> list[Reason]:
    """The durable outbox of writes (when mediarithmics is configured): open and writable."""
    if not all(value for _name, value in services.mediarithmics.required):
        return []
    try:
        outbox = services.outbox
    except ProxyError as error:
        report["outbox"] = {"usable": False, "writable": False}
        problem = filesystem_problem(services.settings.outbox_path,
                                     int(services.settings.outbox_min_free_mb * 2**20))
        if problem:  # the likeliest reason it could not be opened
            return [Reason("outbox_unwritable", "outbox",
                           f"writes cannot be recorded: {problem}; they answer 503 until it is fixed")]
        return [Reason("outbox_unavailable", "outbox", error.message)]
    problem = outbox.write_problem(int(services.settings.outbox_min_free_mb * 2**20))
    try:
        counts = outbox.counts()
    except sqlite3.Error as exc:  # a full disk can fail reads too (WAL index): look again now
        problem = outbox.write_problem(int(services.settings.outbox_min_free_mb * 2**20), fresh=True)
        counts, problem = {}, problem or f"it cannot be read ({exc})"
    report["outbox"] = {"usable": not problem, "writable": not problem, **counts}
    if not problem:
        return []
    return [Reason("outbox_unwritable", "outbox",
                   f"writes cannot be recorded: {problem}; they answer 503 until it is fixed")]


def check_experiment_flags(services: Services, report: dict[str, Any]) -> list[Reason]:
    """Local experiment mode: this process's flag configuration and its age (a probe also
    starts a due refresh, so a worker loads its flags before the first send)."""
    store = services.flag_store
    if store is None:
        return []
    store.current()
    state = report["experiment_flags"] = store.state()
    if state["usable"]:
        return []
    why = "none fetched yet" if not state["loaded"] else f"it is {state['age_seconds']} s old"
    return [Reason("experiment_flags_stale", "experiment_flags",
                   f"no usable experiment flag configuration ({why}); variants are evaluated remotely")]


CHECKS: list[Check] = [check_cache, check_upstreams, check_outbox, check_experiment_flags]


def readiness(services: Services, strict: bool = False) -> tuple[int, dict[str, Any]]:
    """(HTTP status, answer) for /readyz."""
    report: dict[str, Any] = {}
    reasons: list[Reason] = []
    for check in CHECKS:
        component = check.__name__.removeprefix("check_")
        try:
            reasons.extend(check(services, report))
        except Exception as exc:  # a broken check is reported, never a 500
            log.exception("readiness check %s failed", component)
            reasons.append(Reason("check_failed", component,
                                  f"the {component} check failed ({type(exc).__name__})",
                                  blocking=component == "cache"))
    ready = not any(reason.blocking for reason in reasons)
    degraded = bool(reasons)
    status = 200 if ready and not (strict and degraded) else 503
    answer: dict[str, Any] = {"ok": status == 200, "ready": ready, "degraded": degraded,
                              "strict": strict, "reasons": [r.as_json() for r in reasons],
                              "worker": os.getpid(), **report}
    if status != 200:
        why = "cannot answer cached data" if not ready else "is degraded (strict check)"
        answer["error"] = {"code": "not_ready" if not ready else "degraded",
                           "message": f"this instance {why}: "
                                      + "; ".join(r.message for r in reasons)}
    return status, answer
