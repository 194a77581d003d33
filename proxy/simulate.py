"""`ccproxy simulate-send`: replay a Braze send against a running proxy, with Braze's own rules.

Each recipient's message is rendered `renders` times (HTML, plain text, AMP) by the same Liquid
engine as the Liquid preview (`liquid_preview`): every `{% connected_content %}` tag makes the
call Braze would make, with Braze's rules (Braze docs, "Connected Content"):
- a 2 s deadline per call; `:retry` retries a 5xx or a failed call up to 5 times;
- GET answers cached per URL for `:cache_max_age` seconds (default 5 minutes; `:no_cache` off);
- an answer over 1 MB fails;
- the unhealthy-host rule: more than 3,000 failures and over 90 % of calls failing within a
  minute halt the host for a minute, during which every call counts as failed.
A message is *aborted* when a `:retry` call still fails after its retries (Braze aborts it),
*fallback* when an answer says `"fallback": true` or `"stale": true` (or `X-Cache:
FALLBACK/STALE`) or a call without `:retry` failed (Braze sends the message built on the error
answer: the template's guard decides what it shows), else *complete*.

The report also counts upstream 429s on both sides (the sandboxes' answers by status, the
proxy's error codes Braze got), follows every write the proxy accepted until it is delivered
or dead (bounded) and asks the mediarithmics sandbox whether each arrived exactly once.
`find_rate` probes rates (doubling, halving, bisection, within bounds) for the highest one at
which no message aborts and the host is never halted.

Concurrency: one process, gevent greenlets (the caller monkey-patches before importing this
module), a bounded pool; the report gives the simulator's own CPU time and how late it started
messages, so a simulator that could not keep up is visible. Everything here (Braze cache, host
health, counters) is in this one process.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import resource
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import gevent
import gevent.pool
import urllib3

from .errors import ScenarioError
from .liquid_preview import (
    ConnectedContentNode,
    ConnectedContentTag,
    Fetched,
    MessageAborted,
    PreviewEnvironment,
    PreviewRun,
    braze_to_liquid,
    liquid_context,
)

TIMEOUT = 2.0  # Braze waits 2 s for a Connected Content answer
RETRIES = 5  # `:retry`: up to 5 more attempts
DEFAULT_CACHE = 300  # a GET answer is reused for 5 minutes unless :cache_max_age says otherwise
MAX_ANSWER = 1024 * 1024
UNHEALTHY_FAILURES, UNHEALTHY_RATIO, UNHEALTHY_WINDOW, HALT_SECONDS = 3000, 0.9, 60.0, 60.0
_DEMO_LINE = re.compile(r"sandbox (\w+) upstream listening on (https?://[\w.:\[\]-]+)")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min)?\s*$")

Clock = Callable[[], float]


# --- Braze's rules, pure and clocked -------------------------------------------------------

class BrazeCache:
    """Braze's per-URL cache of successful GET answers."""

    def __init__(self, clock: Clock = time.monotonic):
        self.clock = clock
        self._answers: dict[str, tuple[float, Fetched]] = {}

    def get(self, url: str) -> Fetched | None:
        entry = self._answers.get(url)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    def put(self, url: str, answer: Fetched, seconds: float) -> None:
        if seconds > 0:
            self._answers[url] = (self.clock() + seconds, answer)


class HostHealth:
    """Braze's unhealthy-host rule for one host: outcomes of the last minute; a halt once more
    than 3,000 failed and over 90 % of them failed."""

    def __init__(self, clock: Clock = time.monotonic):
        self.clock = clock
        self._seconds: dict[int, list[int]] = {}  # whole second -> [calls, failures]
        self.halted_until = 0.0
        self.halts: list[float] = []  # clock times a halt began

    def halted(self) -> bool:
        return self.clock() < self.halted_until

    def record(self, ok: bool) -> None:
        now = self.clock()
        second = int(now)
        bucket = self._seconds.setdefault(second, [0, 0])
        bucket[0] += 1
        bucket[1] += 0 if ok else 1
        for old in [s for s in self._seconds if s <= second - UNHEALTHY_WINDOW]:
            del self._seconds[old]
        calls = sum(b[0] for b in self._seconds.values())
        failures = sum(b[1] for b in self._seconds.values())
        if not self.halted() and failures > UNHEALTHY_FAILURES and failures > UNHEALTHY_RATIO * calls:
            self.halted_until = now + HALT_SECONDS
            self.halts.append(now)
            self._seconds.clear()


def is_fallback(body: Any, headers: Any) -> bool:
    """The proxy answered with its fallback or a stale copy (the content is not the user's own)."""
    if isinstance(body, dict) and (body.get("fallback") is True or body.get("stale") is True):
        return True
    return str(headers.get("X-Cache", "")).upper() in ("FALLBACK", "STALE")


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def parse_duration(value: Any) -> float:
    """30, "30s", "2m", "500ms" -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ScenarioError(f"not a duration: {value!r} (write 30, \"30s\", \"2m\" or \"500ms\")")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number / 1000 if unit == "ms" else number * 60 if unit in ("m", "min") else number


# --- the scenario ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FaultStep:
    """At `at` seconds, `upstream` gets `mode` (a sandbox fault, or `latency`) for `duration`."""

    at: float
    upstream: str
    mode: str
    duration: float
    seconds: float  # the mode's parameter: Retry-After, delay, added latency

    def describe(self) -> str:
        return f"{self.upstream} {self.mode}({self.seconds:g}) at {self.at:g}s for {self.duration:g}s"


def read_faults(path: Path) -> list[FaultStep]:
    """`[[fault]]` tables: at, upstream, mode, duration (default 60 s), seconds."""
    from .sandbox.base import FAULT_MODES

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read faults file {path}: {exc}") from None
    steps = []
    for number, entry in enumerate(raw.get("fault", []), 1):
        mode = str(entry.get("mode", ""))
        if mode not in FAULT_MODES and mode != "latency":
            raise ScenarioError(f"{path} fault {number}: unknown mode {mode!r} "
                                f"(one of latency, {', '.join(FAULT_MODES)})")
        if not entry.get("upstream"):
            raise ScenarioError(f"{path} fault {number}: needs an upstream")
        steps.append(FaultStep(parse_duration(entry.get("at", 0)), str(entry["upstream"]), mode,
                               parse_duration(entry.get("duration", 60)),
                               parse_duration(entry.get("seconds", 0))))
    return sorted(steps, key=lambda s: s.at)


def sandboxes_from_log(text: str) -> dict[str, str]:
    """The sandbox URLs a `ccproxy demo` logs at start-up ("sandbox X upstream listening on U")."""
    return dict(_DEMO_LINE.findall(text))


def read_recipients(path: Path | None, count: int, prefix: str = "sim") -> list[dict[str, Any]]:
    """Attributes per recipient: a CSV's columns (a `user_id` or `external_id` column, any
    others as attributes; `custom_attribute.x` columns allowed), else generated users
    `<prefix>-000001`... (a new prefix misses the proxy's cache of an earlier run)."""
    if path is None:
        return [{"user_id": f"{prefix}-{i:06d}", "email_address": f"{prefix}-{i:06d}@example.com",
                 "first_name": "Sim"} for i in range(count)]
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k}
                    for row in csv.DictReader(handle)]
    except OSError as exc:
        raise ScenarioError(f"cannot read users {path}: {exc}") from None
    for row in rows:
        if "external_id" in row and "user_id" not in row:
            row["user_id"] = row["external_id"]
    if not rows or "user_id" not in rows[0]:
        raise ScenarioError(f"{path} needs a header row with a user_id (or external_id) column")
    return rows[:count] if count else rows


def template_liquid(names: list[str], base: str, api_key: str) -> str:
    """The Braze Liquid of catalogue templates, as the preview page's snippets give it."""
    from . import config
    from .endpoints import build_registry
    from .rendering import TemplateLibrary, default_templates_dir, template_args
    from .snippets import USER_KEYS, SnippetPolicy, braze_snippets

    settings = config.load()
    library = TemplateLibrary(default_templates_dir())
    policy = SnippetPolicy(settings.email_hash_liquid, settings.braze_credential if api_key else None,
                           build_registry().fresh_seconds(settings))
    parts = []
    for name in names:
        if name not in library.templates:
            raise ScenarioError(f"no template named {name!r} (have: {', '.join(sorted(library.templates))})")
        template = library.templates[name]
        args = template_args(template, {})
        first_id = next((p for p in template.params if p in USER_KEYS), None)
        if first_id:
            args[first_id] = "x"  # any value: the snippet writes the Braze expression instead
        parts.append(braze_snippets(template, args, base, policy)["data"])
    return "\n".join(parts)


# --- calls as Braze makes them ---------------------------------------------------------------

@dataclass
class Stats:
    """Counters of one run; every field only grows."""

    messages: Counter[str] = field(default_factory=Counter)  # complete / fallback / aborted
    aborted_reasons: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)  # requested, braze_cache_hits, halted...
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, per attempt
    writes: Counter[str] = field(default_factory=Counter)
    write_ids: set[str] = field(default_factory=set)  # the proxy's ids of the writes it accepted
    error_codes: Counter[str] = field(default_factory=Counter)  # the proxy's error codes, per attempt
    sent_after_failure: int = 0  # fallback messages sent on a failed call (no :retry on it)
    max_lag: float = 0.0
    last_start: float = 0.0  # when the last message was started (its offset from the run's start)


class BrazeClient:
    """Makes one connected_content call as Braze would: cache, deadline, retries, health."""

    def __init__(self, api_key: str, concurrency: int, stats: Stats, clock: Clock = time.monotonic):
        self.api_key = api_key
        self.stats = stats
        self.cache = BrazeCache(clock)
        self.health: dict[str, HostHealth] = {}
        self.clock = clock
        self.http = urllib3.PoolManager(maxsize=concurrency, retries=False,
                                        timeout=urllib3.Timeout(connect=TIMEOUT, read=TIMEOUT))

    def fetch(self, url: str, method: str, options: dict[str, Any], record: dict[str, Any]) -> Fetched:
        stats = self.stats
        stats.calls["requested"] += 1
        host = urlsplit(url).netloc.lower()
        health = self.health.setdefault(host, HostHealth(self.clock))
        cacheable = method == "get" and "no_cache" not in options
        if cacheable:
            hit = self.cache.get(url)
            if hit is not None:
                stats.calls["braze_cache_hits"] += 1
                record["fallback"] = hit.cache == "FALLBACK"
                return hit
        attempts = 1 + (RETRIES if "retry" in options else 0)
        answer, failure = Fetched(0, ""), None  # type: tuple[Fetched, str | None]
        for attempt in range(attempts):
            if health.halted():
                stats.calls["halted"] += 1
                answer, failure = Fetched(0, ""), "host halted"
                break
            stats.calls["attempts"] += 1
            if attempt:
                stats.calls["retries"] += 1
            answer, failure = self._attempt(url, method, options)
            health.record(failure is None)
            if failure is None or not _retryable(failure):
                break  # success, or a 4xx that no retry would change
        if failure:
            stats.calls["failed"] += 1
            record["failed"] = failure
            return answer
        record["fallback"] = answer.cache == "FALLBACK"
        if record["fallback"]:
            stats.calls["fallback_answers"] += 1
        if method != "get":
            stats.writes["answered"] += 1
            if isinstance(answer.body, dict) and answer.body.get("id"):
                stats.write_ids.add(str(answer.body["id"]))
                stats.writes["duplicate_answers"] += answer.body.get("duplicate") is True
        if cacheable:
            age = str(options.get("cache_max_age", DEFAULT_CACHE))
            self.cache.put(url, answer, float(age) if age.isdigit() else DEFAULT_CACHE)
        return answer

    def _attempt(self, url: str, method: str, options: dict[str, Any]) -> tuple[Fetched, str | None]:
        """One HTTP exchange within Braze's 2 s; (answer, None) or (answer, why it failed)."""
        headers = {str(k): str(v) for k, v in (options.get("headers") or {}).items()} \
            if isinstance(options.get("headers"), dict) else {}
        if options.get("basic_auth") and self.api_key:
            token = base64.b64encode(f"braze:{self.api_key}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        body = options.get("body")
        if isinstance(body, dict):
            body = json.dumps(body)
        if method != "get":
            self.stats.writes["attempted"] += 1
            headers.setdefault("Content-Type", str(options.get("content_type") or "application/json"))
        started = self.clock()
        response = None
        try:
            with gevent.Timeout(TIMEOUT):
                response = self.http.request(method.upper(), url, headers=headers, body=body,
                                             preload_content=False, redirect=False)
                raw = response.read(MAX_ANSWER + 1)
        except gevent.Timeout:
            self._done(started, "timeout")
            return Fetched(0, ""), "timeout"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._done(started, "transport")
            return Fetched(0, ""), f"transport: {type(exc).__name__}"
        finally:
            if response is not None:
                response.release_conn()
        self._done(started, str(response.status))
        if len(raw) > MAX_ANSWER:
            return Fetched(response.status, ""), "answer over 1 MB"
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        answer = Fetched(response.status, parsed, "FALLBACK" if is_fallback(parsed, response.headers) else "-")
        if response.status >= 400:
            error = parsed.get("error") if isinstance(parsed, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            self.stats.error_codes[f"{response.status} {code or '-'}"] += 1
            return answer, f"HTTP {response.status}"
        return answer, None

    def _done(self, started: float, status: str) -> None:
        self.stats.latencies.append(self.clock() - started)
        self.stats.statuses[status] += 1


class SimulatedNode(ConnectedContentNode):
    """The preview's connected_content tag, but the call goes out over HTTP as Braze's would."""

    @staticmethod
    def _fetch(run: PreviewRun, url: str, method: str, record: dict[str, Any]) -> Fetched:
        assert isinstance(run, SimulatedRun)
        return run.client.fetch(url, method, record["options"], record)


@dataclass
class SimulatedRun(PreviewRun):
    """One render's state; the calls go through `client`, never a resolver."""

    client: Any = None


class SimulatedTag(ConnectedContentTag):
    node_class = SimulatedNode


class SimulatedEnvironment(PreviewEnvironment):
    """The preview environment with the HTTP tag; each greenlet renders with its own run, and
    a tag's markup is parsed once, not per render."""

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        self.add_tag(SimulatedTag)

    @property
    def preview_run(self) -> PreviewRun:  # type: ignore[override]
        return gevent.getcurrent().sim_run  # type: ignore[attr-defined,no-any-return]

    @preview_run.setter
    def preview_run(self, run: PreviewRun) -> None:
        gevent.getcurrent().sim_run = run  # type: ignore[attr-defined]

    def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(source, str):
            return super().from_string(source, *args, **kwargs)
        cache: dict[str, Any] = self.__dict__.setdefault("_parsed", {})
        if source not in cache:
            cache[source] = super().from_string(source)
        return cache[source]


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Scenario:
    url: str
    liquid: str
    recipients: list[dict[str, Any]]
    rate: float  # messages per minute
    renders: int = 3
    api_key: str = ""
    concurrency: int = 200
    sandboxes: dict[str, str] = field(default_factory=dict)
    faults: list[FaultStep] = field(default_factory=list)
    drain_timeout: float = 60.0  # seconds to wait after the send for accepted writes to be delivered


def require_proxy(url: str, seconds: float = 10.0) -> None:
    """Stop with a clear line when no proxy answers at `url`: every call would fail on the
    transport, and the table would read as a send in which nothing aborted."""
    http = urllib3.PoolManager(retries=False, timeout=5.0)
    deadline = time.monotonic() + seconds
    while True:
        try:
            if http.request("GET", f"{url}/healthz").status == 200:
                return
            problem = "its /healthz does not answer 200"
        except urllib3.exceptions.HTTPError as exc:
            problem = f"it cannot be reached ({type(exc).__name__})"
        if time.monotonic() >= deadline:
            raise ScenarioError(f"no proxy at {url}: {problem}; start one (ccproxy demo) or pass --url")
        time.sleep(0.5)  # a proxy still starting gets a few seconds


def _sandbox_stats(sandboxes: dict[str, str]) -> dict[str, dict[str, Any]]:
    http = urllib3.PoolManager(retries=False, timeout=5.0)
    out = {}
    for name, url in sandboxes.items():
        try:
            out[name] = json.loads(http.request("GET", f"{url}/__sandbox/stats").data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ScenarioError(f"sandbox {name} at {url} does not answer /__sandbox/stats: {exc}") from None
    return out


def _apply_fault(sandbox: str, step: FaultStep, on: bool) -> None:
    http = urllib3.PoolManager(retries=False, timeout=5.0)
    if step.mode == "latency":
        http.request("POST", f"{sandbox}/__sandbox/config", json={"latency": step.seconds if on else 0})
    else:
        http.request("POST", f"{sandbox}/__sandbox/faults",
                     json={"mode": step.mode if on else "none", "seconds": step.seconds})


def run(scenario: Scenario, progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Send the message to every recipient at the scenario's rate; the report as a dict."""
    for step in scenario.faults:
        if step.upstream not in scenario.sandboxes:
            raise ScenarioError(f"fault for {step.upstream!r} but no sandbox URL for it "
                                "(give --sandbox NAME=URL or --demo-log)")
    env = SimulatedEnvironment()
    try:
        template = env.from_string(braze_to_liquid(scenario.liquid))
    except Exception as exc:  # python-liquid's syntax errors: one line for the operator
        raise ScenarioError(f"the message does not parse: {exc}") from None
    tags = sum(1 for _ in _tags(template))
    if not tags:
        raise ScenarioError("the message has no connected_content tag: nothing to simulate")
    stats = Stats()
    client = BrazeClient(scenario.api_key, scenario.concurrency, stats)
    before = _sandbox_stats(scenario.sandboxes)
    applied: list[dict[str, Any]] = []
    cpu0, start = _cpu(), time.monotonic()

    # Braze gives every send its own dispatch id ({{campaign.${dispatch_id}}}, the usual part
    # of a write's idempotency key): a new one per run unless the recipients carry one.
    dispatch = f"sim-{time.time_ns():x}"

    def send(attributes: dict[str, Any]) -> None:
        outcome, reason, sent_after_failure = "complete", "", [False]
        context = liquid_context({"campaign.dispatch_id": dispatch, **attributes})
        for _ in range(scenario.renders):
            run_ = SimulatedRun(_no_resolver, set(), client=client)
            env.preview_run = run_  # this greenlet's run
            try:
                template.render(**context)
            except MessageAborted as abort:
                outcome, reason = "aborted", abort.reason or "abort_message"
            failed = [c for c in run_.calls if c.get("failed")]
            # With :retry, a call still failing after the retries aborts the message; without
            # it, Braze sends the message built on the error answer (the template's guard
            # decides what the recipient reads): it counts as fallback, never complete.
            fatal = [c["failed"] for c in failed if "retry" in c["options"] and _retryable(c["failed"])]
            if fatal and outcome != "aborted":
                outcome, reason = "aborted", fatal[0]
            if outcome != "aborted" and (failed or any(c.get("fallback") for c in run_.calls)):
                outcome = "fallback"
                sent_after_failure[0] = sent_after_failure[0] or bool(failed)
            if outcome == "aborted":
                break  # Braze drops the whole message
        stats.messages[outcome] += 1
        if outcome == "fallback" and sent_after_failure[0]:
            stats.sent_after_failure += 1
        if reason:
            stats.aborted_reasons[_reason_kind(reason)] += 1

    events = sorted([(s.at, s, True) for s in scenario.faults] +
                    [(s.at + s.duration, s, False) for s in scenario.faults], key=lambda e: e[0])

    def apply(step: FaultStep, on: bool) -> None:
        _apply_fault(scenario.sandboxes[step.upstream], step, on)
        applied.append({"fault": step.describe(), "action": "start" if on else "end",
                        "at_s": round(time.monotonic() - start, 1)})

    # Faults due at the start are in place before the first message: a greenlet could be
    # scheduled after the first sends on a busy machine.
    while events and events[0][0] <= 0:
        _, step, on = events.pop(0)
        apply(step, on)

    def faults() -> None:
        for at, step, on in events:
            gevent.sleep(max(0.0, start + at - time.monotonic()))
            apply(step, on)

    def show() -> None:
        while True:
            gevent.sleep(1.0)
            _progress(progress, stats, len(scenario.recipients), time.monotonic() - start)

    fault_greenlet = gevent.spawn(faults)
    progress_greenlet = gevent.spawn(show) if progress else None
    pool = gevent.pool.Pool(scenario.concurrency)
    interval = 60.0 / scenario.rate
    try:
        for index, attributes in enumerate(scenario.recipients):
            due = start + index * interval
            gevent.sleep(max(0.0, due - time.monotonic()))
            pool.spawn(send, attributes)  # blocks while the pool is full: that shows as lag
            stats.max_lag = max(stats.max_lag, time.monotonic() - due)
            stats.last_start = time.monotonic() - start
        pool.join()
    finally:
        fault_greenlet.kill()
        ended = {e["fault"] for e in applied if e["action"] == "end"}
        for step in scenario.faults:  # leave no fault behind
            if step.describe() not in ended:
                _apply_fault(scenario.sandboxes[step.upstream], step, False)
                applied.append({"fault": step.describe(), "action": "end (run over)",
                                "at_s": round(time.monotonic() - start, 1)})
        if progress_greenlet is not None:
            progress_greenlet.kill()
    wall, cpu = time.monotonic() - start, _cpu() - cpu0
    if progress:
        _progress(progress, stats, len(scenario.recipients), wall)
        progress.write("\n")
    states, drain_s = drain(scenario, stats.write_ids, client.http, progress)
    after = _sandbox_stats(scenario.sandboxes)
    halts = [{"host": host, "at_s": round(t - start, 1), "until_s": round(t - start + HALT_SECONDS, 1)}
             for host, health in client.health.items() for t in health.halts]
    result = report(scenario, stats, tags, before, after, applied, halts, wall, cpu)
    result["writes"].update(_delivery(states, drain_s, before, after))
    return result


FINAL_STATES = ("delivered", "dead")


def drain(scenario: Scenario, write_ids: set[str], http: urllib3.PoolManager,
          progress: TextIO | None) -> tuple[Counter[str], float]:
    """Wait (at most `drain_timeout`) until every accepted write is delivered or dead, asking
    the proxy's `GET /v1/mediarithmics/writes/<id>`; the last state of each write, and the wait."""
    started = time.monotonic()
    states: dict[str, str] = {write_id: "queued" for write_id in write_ids}
    headers = {}
    if scenario.api_key:
        token = base64.b64encode(f"braze:{scenario.api_key}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"

    def ask(write_id: str) -> None:
        try:
            answer = http.request("GET", f"{scenario.url}/v1/mediarithmics/writes/{write_id}",
                                  headers=headers, timeout=5.0)
            body = json.loads(answer.data)
            states[write_id] = str(body.get("state", "unknown")) if answer.status == 200 else "unknown"
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            pass  # asked again next round

    while True:
        pending = [w for w, state in states.items() if state not in FINAL_STATES]
        if not pending:
            break
        pool = gevent.pool.Pool(min(scenario.concurrency, 50))
        for write_id in pending:
            pool.spawn(ask, write_id)
        pool.join()
        still = sum(1 for state in states.values() if state not in FINAL_STATES)
        if progress:
            progress.write(f"\rwaiting for writes: {len(states) - still}/{len(states)} delivered or dead ")
            progress.flush()
        if not still or time.monotonic() - started >= scenario.drain_timeout:
            break
        gevent.sleep(0.5)
    if progress and states:
        progress.write("\n")
    return Counter(states.values()), time.monotonic() - started


def _delivery(states: Counter[str], drain_s: float, before: dict[str, Any],
              after: dict[str, Any]) -> dict[str, Any]:
    """Writes accepted vs delivered, and whether mediarithmics got each exactly once (when its
    sandbox is known: it counts writes received and identical writes received again)."""
    out: dict[str, Any] = {
        "delivered": states["delivered"], "queued": states["queued"] + states["failed"],
        "dead": states["dead"], "unknown": states["unknown"], "drain_s": round(drain_s, 1),
    }
    if "mediarithmics" in after:
        def counter(name: str) -> int:
            return int(after["mediarithmics"].get("counters", {}).get(name, 0)
                       - before.get("mediarithmics", {}).get("counters", {}).get(name, 0))
        received, duplicated = counter("writes_received"), counter("writes_duplicated")
        # More received than delivered: writes the proxy stored whose 202 came after Braze had
        # given up (2 s), so Braze never learnt their ids; each still arrived once.
        out.update({"mediarithmics_received": received, "mediarithmics_duplicated": duplicated,
                    "accepted_after_braze_gave_up": max(0, received - duplicated - states["delivered"]),
                    "exactly_once": duplicated == 0 and received >= states["delivered"]})
    return out


def _retryable(failure: str) -> bool:
    """What Braze's :retry retries: a 5xx, a timeout, a failed connection (and a halted host,
    which fails every attempt)."""
    return failure.startswith("HTTP 5") or not failure.startswith(("HTTP", "answer over"))


def _no_resolver(path: str, params: dict[str, str]) -> Fetched:
    raise AssertionError("a simulated render makes its calls over HTTP")


def _tags(node: Any) -> Iterator[Any]:
    """Every connected_content node of a parsed template, in blocks and branches too."""
    for child in getattr(node, "nodes", None) or []:
        if isinstance(child, ConnectedContentNode):
            yield child
        yield from _tags(child)
        for attr in ("block", "consequence", "alternative", "default"):
            inner = getattr(child, attr, None)
            if inner is not None and not isinstance(inner, bool):
                yield from _tags(inner)
        for branch in getattr(child, "conditional_alternatives", None) or []:
            yield from _tags(branch)


def _reason_kind(reason: str) -> str:
    """Group abort reasons: "HTTP 503", "timeout", "host halted", "after :retry"..."""
    if "after :retry" in reason:
        match = re.search(r"failed with (\d+)", reason)
        return f"HTTP {match.group(1)} after :retry" if match else "after :retry"
    return reason.split(":")[0] if reason.startswith("transport") else reason


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress(out: TextIO | None, stats: Stats, total: int, elapsed: float) -> None:
    if out is None:
        return
    done = sum(stats.messages.values())
    width = 24
    bar = "#" * int(width * done / max(total, 1))
    out.write(f"\r[{bar:<{width}}] {done}/{total} messages  {stats.messages['fallback']} fallback  "
              f"{stats.messages['aborted']} aborted  {stats.calls['attempts']} calls  {elapsed:.0f}s ")
    out.flush()


def report(scenario: Scenario, stats: Stats, tags: int, before: dict[str, Any], after: dict[str, Any],
           applied: list[dict[str, Any]], halts: list[dict[str, Any]], wall: float, cpu: float) -> dict[str, Any]:
    """The JSON report: every message counted once, every call accounted for."""
    messages = sum(stats.messages.values())
    recipients = len(scenario.recipients)
    upstreams = {}
    for name in after:
        calls = after[name].get("calls", 0) - before.get(name, {}).get("calls", 0)
        too_many = (after[name].get("statuses", {}).get("429", 0)
                    - before.get(name, {}).get("statuses", {}).get("429", 0))
        upstreams[name] = {"calls": calls, "per_recipient": round(calls / max(recipients, 1), 3),
                           "answered_429": too_many}
    sent = stats.last_start or wall
    achieved = 60.0 * max(messages - 1, 0) / sent if sent > 0 else 0.0
    # The simulator held the send back when it was short of CPU or started messages at under
    # 90 % of the rate (a moment's lag, while its calls in flight were all taken, is not that).
    limited = bool(cpu > 0.85 * wall or (messages > 1 and achieved < 0.9 * scenario.rate))
    return {
        "scenario": {"url": scenario.url, "recipients": recipients, "rate_per_minute": scenario.rate,
                     "renders": scenario.renders, "connected_content_tags": tags,
                     "concurrency": scenario.concurrency},
        "messages": {"total": messages, "complete": stats.messages["complete"],
                     "fallback": stats.messages["fallback"], "aborted": stats.messages["aborted"],
                     "sent_after_failed_call": stats.sent_after_failure},
        "aborted_reasons": dict(stats.aborted_reasons),
        "calls": {"requested": stats.calls["requested"], "braze_cache_hits": stats.calls["braze_cache_hits"],
                  "halted": stats.calls["halted"], "attempts": stats.calls["attempts"],
                  "retries": stats.calls["retries"], "failed": stats.calls["failed"],
                  "per_message": round(stats.calls["attempts"] / max(messages, 1), 3),
                  "statuses": dict(stats.statuses)},
        "latency_ms": {"p50": round(percentile(stats.latencies, 0.5) * 1000, 1),
                       "p99": round(percentile(stats.latencies, 0.99) * 1000, 1),
                       "max": round(max(stats.latencies, default=0.0) * 1000, 1)},
        "host_halted": halts,
        "upstreams": upstreams,
        # Upstream 429s as the upstreams answered them, and what Braze saw meanwhile: the
        # proxy's errors by status and code (503 upstream_rate_limited) and its fallbacks.
        "rate_limited": {
            "upstream_429s": {name: up["answered_429"] for name, up in upstreams.items()},
            "braze_saw_429": stats.statuses["429"],
            "braze_saw_upstream_rate_limited": sum(
                n for code, n in stats.error_codes.items() if code.endswith(" upstream_rate_limited")),
            "braze_saw_fallback_answers": stats.calls["fallback_answers"],
        },
        "errors": dict(stats.error_codes),
        # attempted: write calls sent (retries included); answered: answered 2xx (each render of
        # a message posts again); accepted: distinct writes the proxy stored (its write ids).
        "writes": {"attempted": stats.writes["attempted"], "answered": stats.writes["answered"],
                   "duplicate_answers": stats.writes["duplicate_answers"],
                   "accepted": len(stats.write_ids)},
        "faults": applied,
        "simulator": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                      "cpu_share": round(cpu / wall, 3) if wall else 0.0,
                      "cpu_ms_per_message": round(1000 * cpu / max(messages, 1), 2),
                      "achieved_rate_per_minute": round(achieved, 1),
                      "max_start_lag_s": round(stats.max_lag, 3),
                      "limited": limited},
    }


def table(result: dict[str, Any]) -> str:
    """The report for a terminal."""
    m, c, lat, sim = result["messages"], result["calls"], result["latency_ms"], result["simulator"]
    total = max(m["total"], 1)
    rows = [
        ("messages", f"{m['total']}"),
        ("  complete", f"{m['complete']} ({100 * m['complete'] / total:.1f} %)"),
        ("  with fallback", f"{m['fallback']} ({100 * m['fallback'] / total:.1f} %)"
         + (f", {m['sent_after_failed_call']} of them sent on a failed call (no :retry)"
            if m.get("sent_after_failed_call") else "")),
        ("  aborted", f"{m['aborted']} ({100 * m['aborted'] / total:.1f} %)"
         + (f"  {result['aborted_reasons']}" if result["aborted_reasons"] else "")),
        ("calls per message", f"{c['per_message']}  ({c['attempts']} made, {c['retries']} retries, "
                              f"{c['braze_cache_hits']} Braze cache hits, {c['halted']} halted)"),
        ("latency p50/p99/max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"),
        ("host halted", ", ".join(f"{h['host']} at {h['at_s']}s until {h['until_s']}s"
                                  for h in result["host_halted"]) or "never"),
    ]
    for name, up in result["upstreams"].items():
        rows.append((f"upstream {name}", f"{up['calls']} calls, {up['per_recipient']} per recipient, "
                                         f"{up['answered_429']} answered 429"))
    limited = result["rate_limited"]
    if any(limited["upstream_429s"].values()) or limited["braze_saw_upstream_rate_limited"]:
        rows.append(("rate limited", f"Braze saw {limited['braze_saw_upstream_rate_limited']} x 503 "
                                     f"upstream_rate_limited, {limited['braze_saw_429']} x 429, "
                                     f"{limited['braze_saw_fallback_answers']} fallback answers"))
    w = result["writes"]
    if w["attempted"]:
        line = (f"{w['accepted']} accepted ({w['answered']} answers, {w['duplicate_answers']} duplicates "
                f"answered as such): {w['delivered']} delivered, {w['queued']} queued, {w['dead']} dead "
                f"after {w['drain_s']} s")
        if "mediarithmics_received" in w:
            line += (f"; mediarithmics received {w['mediarithmics_received']}, "
                     f"{w['mediarithmics_duplicated']} twice: "
                     + ("exactly once" if w["exactly_once"] else "NOT exactly once"))
            if w.get("accepted_after_braze_gave_up"):
                line += (f" ({w['accepted_after_braze_gave_up']} stored by the proxy after Braze's 2 s: "
                         "Braze never saw their ids)")
        rows.append(("writes", line))
    for event in result["faults"]:
        rows.append(("fault", f"{event['action']} {event['fault']} (at {event['at_s']}s)"))
    rows.append(("simulator", f"{sim['cpu_s']} s CPU in {sim['wall_s']} s ({100 * sim['cpu_share']:.0f} % "
                              f"of a core, {sim['cpu_ms_per_message']} ms a message), "
                              f"{sim['achieved_rate_per_minute']:g} messages/min, started messages up to "
                              f"{sim['max_start_lag_s']} s late"
                              + ("  LIMITED: the simulator could not keep the rate" if sim["limited"] else "")))
    search = result.get("find_rate")
    if search:
        for probe in search["probes"]:
            rows.append(("probe", f"{probe['rate_per_minute']:g}/min x {probe['recipients']}: "
                                  f"{probe['aborted']} aborted, {probe['fallback']} fallback"
                                  f"{', host halted' if probe['halted'] else ''}"
                                  f"{', simulator limited' if probe['simulator_limited'] else ''}"
                                  f" -> {'safe' if probe['safe'] else 'unsafe'}"))
        safe = search["safe_rate_per_minute"]
        rows.append(("highest safe rate", (f"{safe:g} messages/min" if safe is not None else "none found")
                     + f" ({search['stopped']})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --- the highest safe rate -------------------------------------------------------------------

@dataclass(frozen=True)
class RateSearch:
    """Bounds of `--find-rate`: each probe sends for `probe_seconds` at its rate, to fresh ids."""

    probe_seconds: float = 20.0
    max_rate: float = 60_000.0  # messages per minute
    min_rate: float = 60.0
    budget_s: float = 600.0  # wall time for every probe together
    max_recipients: int = 100_000  # recipients for every probe together
    precision: float = 0.1  # stop bisecting when the bounds are within 10 %


def probe_safe(result: dict[str, Any]) -> bool:
    """A rate is safe when no message aborted and Braze never halted the host (and the
    simulator kept the rate, else the probe says nothing about the proxy)."""
    return (result["messages"]["aborted"] == 0 and not result["host_halted"]
            and not result["simulator"]["limited"])


def find_rate(scenario: Scenario, bounds: RateSearch, progress: TextIO | None = sys.stderr,
              runner: Callable[[Scenario], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Double the rate from `scenario.rate` while probes are safe, halve it while they are not,
    then bisect between the highest safe and the lowest unsafe rate; within the bounds. The
    report of the highest safe probe (else the last), with `find_rate`: every probe made."""
    runner = runner or (lambda sub: run(sub, progress=None))
    started = time.monotonic()
    probes: list[dict[str, Any]] = []
    results: dict[float, dict[str, Any]] = {}
    safe: float | None = None
    unsafe: float | None = None
    rate, used, stopped = min(scenario.rate, bounds.max_rate), 0, ""
    token = time.strftime("%H%M%S")  # another search against the same proxy uses other ids
    while True:
        count = max(10, int(rate * bounds.probe_seconds / 60))
        if used + count > bounds.max_recipients:
            stopped = f"recipient bound reached ({bounds.max_recipients})"
            break
        if probes and time.monotonic() - started + bounds.probe_seconds > bounds.budget_s:
            stopped = f"time bound reached ({bounds.budget_s:g} s)"
            break
        sub = replace_recipients(scenario, rate, count, f"{token}{len(probes)}")
        result = runner(sub)
        used += count
        ok = probe_safe(result)
        m = result["messages"]
        probes.append({"rate_per_minute": rate, "recipients": count, "complete": m["complete"],
                       "fallback": m["fallback"], "aborted": m["aborted"], "halted": bool(result["host_halted"]),
                       "p99_ms": result["latency_ms"]["p99"],
                       "achieved_rate_per_minute": result["simulator"].get("achieved_rate_per_minute"),
                       "simulator_cpu_share": result["simulator"].get("cpu_share"),
                       "simulator_limited": result["simulator"]["limited"], "safe": ok})
        results[rate] = result
        if progress:
            sim = result["simulator"]
            progress.write(f"probe {rate:g}/min, {count} messages: {m['aborted']} aborted, "
                           f"{m['fallback']} fallback{', host halted' if result['host_halted'] else ''}"
                           + (f", simulator limited ({sim.get('achieved_rate_per_minute')}/min, "
                              f"{sim.get('max_start_lag_s')} s late, {sim.get('cpu_share')} of a core)"
                              if sim["limited"] else "")
                           + f" -> {'safe' if ok else 'unsafe'}\n")
            progress.flush()
        if ok:
            safe = rate
        elif result["simulator"]["limited"] and m["aborted"] == 0 and not result["host_halted"]:
            stopped = "the simulator could not send faster on this machine: the proxy's limit is higher"
            break
        else:
            unsafe = rate if unsafe is None else min(unsafe, rate)
        if safe is None:
            rate = rate / 2
            if rate < bounds.min_rate:
                stopped = f"unsafe down to {bounds.min_rate:g} messages/min"
                break
        elif unsafe is None:
            if rate >= bounds.max_rate:
                stopped = f"safe at the highest rate probed ({bounds.max_rate:g} messages/min)"
                break
            rate = min(rate * 2, bounds.max_rate)
        else:
            if unsafe <= safe * (1 + bounds.precision):
                stopped = f"bisected to within {100 * bounds.precision:g} %"
                break
            rate = round((safe + unsafe) / 2)
    if not probes:
        raise ScenarioError(f"--find-rate-recipients {bounds.max_recipients} is fewer than the first "
                            f"probe needs ({max(10, int(rate * bounds.probe_seconds / 60))})")
    best = results[safe] if safe is not None else results[probes[-1]["rate_per_minute"]]
    return {**best, "find_rate": {
        "safe_rate_per_minute": safe, "lowest_unsafe_rate_per_minute": unsafe, "stopped": stopped,
        "probes": probes, "probe_seconds": bounds.probe_seconds, "max_rate": bounds.max_rate,
        "budget_s": bounds.budget_s, "max_recipients": bounds.max_recipients,
        "recipients_used": used, "wall_s": round(time.monotonic() - started, 1)}}


def replace_recipients(scenario: Scenario, rate: float, count: int, probe: str) -> Scenario:
    """The scenario at `rate` for `count` recipients with ids no earlier probe used (a warm
    cache would flatter later probes), other attributes taken from the scenario's recipients."""
    import dataclasses

    rows = scenario.recipients or [{}]
    recipients = []
    for i in range(count):
        user = f"probe{probe}-{rate:g}-{i:06d}"
        recipients.append({**rows[i % len(rows)], "user_id": user, "email_address": f"{user}@example.com"})
    return dataclasses.replace(scenario, rate=rate, recipients=recipients)
