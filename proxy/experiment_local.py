"""Local evaluation of Amplitude Experiment flags (`CCPROXY_EXPERIMENT_MODE=local`).

Flag configurations come from the Flags API through the proxy's own client (deadline, breaker,
metrics), never through the SDK's poller: that is a timer thread, which does not survive
gunicorn's fork. They are evaluated with the official engine of `amplitude-experiment`
(its flag type, its topological sort for flag dependencies, its `EvaluationEngine`), imported
inside functions only: the package loads ssl, which must not happen in the gunicorn master
before gevent patches the workers.

Per worker process: each process holds its own configuration and refreshes it in the
background (one thread, a greenlet under gevent, started by a request that finds the
configuration older than `CCPROXY_EXPERIMENT_FLAG_REFRESH`), and none waits on the send path.
Without Redis `N` workers make `N` Flags API calls per interval; with `CCPROXY_REDIS_URL` the
refresh goes through `experiment_flags_shared.py`: one call per interval for the deployment. A failed refresh keeps the last good
configuration up to `CCPROXY_EXPERIMENT_FLAG_MAX_AGE` (a killed flag must not live forever);
older, or none yet: the endpoint evaluates remotely.

Decisions are remembered per configuration and process (`Memo`: the last 2,000, so the
renders of one message are evaluated once by the worker that sees them).

Only what local evaluation can decide is decided here (`Decision.remote` lists the rest, which
the endpoint evaluates remotely with no-track): a flag is left to remote evaluation when it, or
a flag it depends on, is marked `evaluationMode: remote`, targets cohorts (not synced here),
groups, the Amplitude ID (ID resolution) or sticky bucketing, or reads a user field or user
property the request did not send (Amplitude would fill it from its own profile). Flags the
configuration does not know, and any flag the engine cannot evaluate, go remote too.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ProxyError

log = logging.getLogger("ccproxy")

# Flags that only group others (holdouts, mutual exclusion): evaluated, never answered alone.
GROUP_FLAG_TYPES = frozenset({"holdout-group", "mutual-exclusion-group"})
# User fields the request itself defines: their absence is the same absence remotely.
IDENTITY_FIELDS = frozenset({"user_id", "device_id"})


@dataclass(frozen=True)
class FlagNeeds:
    """What one flag (with the flags it depends on) needs from an evaluation context."""

    remote_only: bool = False  # local evaluation can never decide it
    fields: frozenset[str] = frozenset()  # context.user fields it reads
    properties: frozenset[str] = frozenset()  # context.user.user_properties it reads
    # Where it compares versions or matches a regex: (field,) or ("user_properties", name).
    versions: frozenset[tuple[str, ...]] = frozenset()
    patterns: frozenset[tuple[str, ...]] = frozenset()


# The engine reads a version with a pattern that backtracks exponentially on a long pre-release
# that does not match (`1.0.0-aaaa…!`: 0.3 s at 22 characters, doubling with each one), and a
# flag's own regex may too: a request's value must pass this linear equivalent, and any value
# a regex sees must be short, or the flag is evaluated remotely instead of stalling the worker.
_SAFE_VERSION = re.compile(r"\d+\.\d+(?:\.\d+(?:-(?:[-\w]+(?:\.[-\w]+)*\.?)?)?)?")
MAX_VERSION_LENGTH = 64
MAX_PATTERN_INPUT = 256
_VERSION_OPS = frozenset({"version less", "version less or equal", "version greater", "version greater or equal"})
_PATTERN_OPS = frozenset({"regex match", "regex does not match"})


@dataclass
class Decision:
    """Variants decided locally, vardata-shaped, and the flags left to remote evaluation."""

    vardata: dict[str, dict[str, Any]] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    # The engine's variants of `vardata` (value and metadata: what an exposure event carries).
    variants: dict[str, Any] = field(default_factory=dict)


# Decisions remembered per configuration and process: Braze renders each message several
# times within seconds (HTML, text, AMP, retries), and the same user with the same context gets
# the same answer from the same configuration, so a repeat costs a lookup, not an evaluation.
# Few: each remembered decision is about a dozen objects that every full garbage collection of
# the worker walks (10,000 of them tripled its pause), and the renders of a message come together.
DECISIONS_REMEMBERED = 2_000
ORDERS_REMEMBERED = 1_000  # evaluation orders (topological sorts) by set of flags asked


class Memo:
    """What one configuration already computed (shared by the refreshes that did not change it;
    a new configuration starts empty, so nothing decided by an older one is ever reused)."""

    def __init__(self) -> None:
        from cachetools import LRUCache

        self.decisions: LRUCache[tuple, Decision] = LRUCache(DECISIONS_REMEMBERED)
        self.orders: LRUCache[tuple[str, ...], list[Any]] = LRUCache(ORDERS_REMEMBERED)
        self.lock = threading.Lock()  # cachetools caches are not thread-safe


@dataclass(frozen=True)
class Configuration:
    flags: dict[str, Any]  # key -> EvaluationFlag
    needs: dict[str, FlagNeeds]
    fetched_at: float
    memo: Memo = field(default_factory=Memo, compare=False, repr=False)


def _selector_needs(selector: list[str]) -> FlagNeeds:
    """What a condition or bucket selector reads; anything but the user context and the
    results of other flags is beyond local evaluation."""
    if len(selector) >= 2 and selector[0] == "result":
        return FlagNeeds()  # a dependency's result: resolved by the topological order
    if len(selector) < 3 or selector[:2] != ["context", "user"]:
        return FlagNeeds(remote_only=True)  # groups, unknown roots
    name = selector[2]
    if name in ("cohort_ids", "amplitude_id"):
        return FlagNeeds(remote_only=True)
    if name == "user_properties":
        if len(selector) < 4:
            return FlagNeeds(remote_only=True)
        return FlagNeeds(properties=frozenset([selector[3]]))
    if name in IDENTITY_FIELDS:
        return FlagNeeds()
    return FlagNeeds(fields=frozenset([name]))


def _merge(needs: list[FlagNeeds]) -> FlagNeeds:
    return FlagNeeds(
        remote_only=any(n.remote_only for n in needs),
        fields=frozenset().union(*(n.fields for n in needs)),
        properties=frozenset().union(*(n.properties for n in needs)),
        versions=frozenset().union(*(n.versions for n in needs)),
        patterns=frozenset().union(*(n.patterns for n in needs)),
    )


def _condition_needs(condition: Any) -> FlagNeeds:
    selector = list(condition.selector or [])
    needs = _selector_needs(selector)
    where = tuple(selector[2:4] if selector[2:3] == ["user_properties"] else selector[2:3])
    if condition.op in _VERSION_OPS and where:
        return _merge([needs, FlagNeeds(versions=frozenset([where]))])
    if condition.op in _PATTERN_OPS and where:
        return _merge([needs, FlagNeeds(patterns=frozenset([where]))])
    return needs


def _own_needs(flag: Any) -> FlagNeeds:
    metadata = flag.metadata or {}
    if metadata.get("evaluationMode") == "remote" or metadata.get("stickyBucketing"):
        return FlagNeeds(remote_only=True)
    found: list[FlagNeeds] = []
    for segment in flag.segments:
        for conjunction in segment.conditions or []:
            found.extend(_condition_needs(c) for c in conjunction)
        if segment.bucket is not None:
            found.append(_selector_needs(list(segment.bucket.selector or [])))
    return _merge(found)


def _needs_with_dependencies(flags: dict[str, Any], own: dict[str, FlagNeeds]) -> dict[str, FlagNeeds]:
    """Each flag's needs with those of every flag it depends on (depth first, without
    recursion: a configuration may chain thousands of flags). An unknown dependency or a
    cycle makes the flag remote only."""
    result: dict[str, FlagNeeds] = {}
    for start in flags:
        if start in result:
            continue
        parts: dict[str, list[FlagNeeds]] = {start: [own[start]]}
        stack = [(start, iter(flags[start].dependencies or []))]
        while stack:
            key, dependencies = stack[-1]
            dependency = next(dependencies, None)
            if dependency is None:
                stack.pop()
                result[key] = _merge(parts.pop(key))
                if stack:
                    parts[stack[-1][0]].append(result[key])
            elif dependency in result:
                parts[key].append(result[dependency])
            elif dependency not in flags or dependency in parts:  # unknown, or a cycle
                parts[key].append(FlagNeeds(remote_only=True))
            else:
                parts[dependency] = [own[dependency]]
                stack.append((dependency, iter(flags[dependency].dependencies or [])))
    return result


def parse_flags(raw: list[dict[str, Any]], fetched_at: float) -> Configuration:
    """Flag configurations in the official engine's type; a flag that cannot be read is
    left out (and so evaluated remotely)."""
    from amplitude_experiment.evaluation.types import EvaluationFlag

    flags: dict[str, Any] = {}
    own: dict[str, FlagNeeds] = {}
    for item in raw:
        time.sleep(0)  # a gevent worker's other requests run between flags (1.3 s of CPU per MB)
        try:
            flag = EvaluationFlag.from_dict(item)
            if not isinstance(flag.key, str) or not isinstance(flag.variants, dict) \
                    or not isinstance(flag.dependencies or [], list):
                raise ValueError("key, variants or dependencies of the wrong type")
            needs = _own_needs(flag)  # reads every segment: a bad one skips the flag, not the rest
        except Exception as exc:  # noqa: BLE001 - the library raises anything on a bad shape
            log.warning("experiment flag configuration %r skipped: %s",
                        item.get("key") if isinstance(item, dict) else None, exc)
            continue
        flags[flag.key], own[flag.key] = flag, needs
    return Configuration(flags, _needs_with_dependencies(flags, own), fetched_at)


def evaluation_context(user_id: str, device_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """The engine's context: `{"user": {...}}` from the ids and the request's `context`."""
    user = {k: v for k, v in context.items() if v is not None and k != "groups"}
    if user_id:
        user["user_id"] = user_id
    if device_id:
        user["device_id"] = device_id
    return {"user": user}


def decidable(needs: FlagNeeds, user: dict[str, Any]) -> bool:
    if needs.remote_only:
        return False
    properties = user.get("user_properties")
    properties = properties if isinstance(properties, dict) else {}
    if not (all(user.get(f) is not None for f in needs.fields)
            and all(properties.get(p) is not None for p in needs.properties)):
        return False

    def value(where: tuple[str, ...]) -> Any:
        return properties.get(where[1]) if where[0] == "user_properties" and len(where) == 2 else user.get(where[0])

    for where in needs.versions:
        version = value(where)
        if isinstance(version, str) and (len(version) > MAX_VERSION_LENGTH or not _SAFE_VERSION.fullmatch(version)):
            return False
    return not any(len(str(value(where))) > MAX_PATTERN_INPUT for where in needs.patterns)


def evaluate(config: Configuration, context: dict[str, Any], requested: list[str]) -> Decision:
    """Evaluate the requested flags (every flag when none) that local evaluation can decide;
    a repeat of the same user, context and flags is answered from the configuration's memo
    (the Decision is shared: callers read it, never change it)."""
    # The renders of one message send the same query, so the context's order repeats too: a
    # plain repr is key enough (another order is only a miss, never a wrong answer).
    key = (repr(context), tuple(requested))
    memo = config.memo
    with memo.lock:
        known = memo.decisions.get(key)
    if known is not None:
        return known
    decision = _evaluate(config, context, requested)
    with memo.lock:
        memo.decisions[key] = decision
    return decision


def _evaluate(config: Configuration, context: dict[str, Any], requested: list[str]) -> Decision:
    from amplitude_experiment.evaluation.engine import EvaluationEngine

    # Every flag when none is asked for, as /v1/vardata answers it: a holdout or mutual
    # exclusion group's own result is not returned (Amplitude's flag dependencies), only used.
    wanted = requested or [key for key, flag in config.flags.items()
                           if (flag.metadata or {}).get("flagType") not in GROUP_FLAG_TYPES]
    local = [k for k in wanted if k in config.flags and decidable(config.needs[k], context["user"])]
    decision = Decision(remote=[k for k in wanted if k not in local])
    if not local:
        return decision
    try:
        results = EvaluationEngine().evaluate(context, _order(config, local))
    except Exception as exc:  # noqa: BLE001 - a configuration the engine cannot evaluate
        log.warning("local experiment evaluation failed, evaluating remotely: %s", exc)
        decision.remote = list(wanted)
        return decision
    for key in local:
        variant = results.get(key)
        if variant is None or not assigned(variant.metadata or {}):
            continue
        decision.variants[key] = variant
        decision.vardata[key] = {"key": variant.key, **({"payload": variant.payload}
                                                        if variant.payload is not None else {})}
    return decision


def _order(config: Configuration, keys: list[str]) -> list[Any]:
    """The flags to evaluate, dependencies first (the engine's topological sort, once per set)."""
    from amplitude_experiment.evaluation.topological_sort import topological_sort

    wanted = tuple(keys)
    with config.memo.lock:
        order = config.memo.orders.get(wanted)
    if order is None:
        order = topological_sort(config.flags, keys)
        with config.memo.lock:
            config.memo.orders[wanted] = order
    return order


def assigned(metadata: dict[str, Any]) -> bool:
    """What `/v1/vardata` answers: not the default (off) variant, not an undeployed flag."""
    return not metadata.get("default") and metadata.get("deployed", True) is not False


class FlagStore:
    """This process's flag configuration, refreshed in the background on demand."""

    def __init__(self, fetch: Callable[[], tuple[list[dict[str, Any]], float]], refresh: float,
                 max_age: float, timer: Callable[[], float] = time.monotonic):
        # fetch() -> (raw configurations, when they were fetched on `timer`'s clock)
        self._fetch = fetch
        self.refresh_interval = refresh
        self.max_age = max_age
        self._timer = timer
        self._config: Configuration | None = None
        self._raw: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_attempt: float | None = None
        self._not_before: float | None = None  # no refresh before this (see refresh())
        self.last_error = ""
        self.refreshes = 0
        self.failures = 0

    def age(self) -> float | None:
        config = self._config
        return None if config is None else max(0.0, self._timer() - config.fetched_at)

    def current(self) -> Configuration | None:
        """The configuration to evaluate with (None: evaluate remotely); starts a background
        refresh when it is due."""
        self._refresh_if_due()
        age = self.age()
        return self._config if age is not None and age <= self.max_age else None

    def _refresh_if_due(self) -> None:
        now = self._timer()
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            age = self.age()
            if self._not_before is not None and now < self._not_before:
                return
            if age is not None and age < self.refresh_interval:
                return
            self._last_attempt = now
            self._thread = threading.Thread(target=self.refresh, name="experiment-flags", daemon=True)
            self._thread.start()

    def refresh(self) -> bool:
        """Fetch and parse once; keep the last good configuration on any failure."""
        try:
            raw, fetched_at = self._fetch()
            previous = self._config
            if previous is not None and (raw is self._raw or raw == self._raw):
                # Unchanged (the usual case): no re-parse, which is CPU in a gevent worker.
                config = Configuration(previous.flags, previous.needs, fetched_at, previous.memo)
            else:
                config = parse_flags(raw, fetched_at)
        except Exception as exc:  # noqa: BLE001 - a lying Flags API: counted, retried after an interval
            self.failures += 1
            self.last_error = exc.message if isinstance(exc, ProxyError) else f"unreadable configuration ({type(exc).__name__})"
            # After a failure, wait one interval before trying again (no hammering).
            self._not_before = (self._last_attempt or self._timer()) + self.refresh_interval
            log.warning("experiment flag configurations not refreshed: %s", self.last_error)
            return False
        # After a success the configuration's age says when (a copy read from Redis may be
        # nearly an interval old already); the short pause only stops a loop should another
        # box's clock run far behind ours.
        self._not_before = self._timer() + min(1.0, self.refresh_interval / 10)
        self._config, self._raw = config, raw
        self.refreshes += 1
        self.last_error = ""
        return True

    def wait(self, timeout: float) -> None:
        """Wait for a background refresh in flight (tests, warm-up)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def state(self) -> dict[str, Any]:
        config, age = self._config, self.age()
        return {
            "loaded": config is not None,
            "age_seconds": None if age is None else round(age, 1),
            "usable": age is not None and age <= self.max_age,
            "flags": 0 if config is None else len(config.flags),
            "refresh_seconds": self.refresh_interval,
            "max_age_seconds": self.max_age,
            "refreshes": self.refreshes,
            "failures": self.failures,
            "last_error": self.last_error,
        }
