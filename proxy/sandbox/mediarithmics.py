"""Sandbox mediarithmics user point API: profiles and user choices (read and write).

Selector values starting with `unknown` are unknown user points (404). Others get a
deterministic profile and two choices: processing 101 (newsletter; refused when the
id contains `optout`) and 102 (personalised offers). Writes change what later reads
return, as the real API does.

Writes received are counted in `/__sandbox/stats` counters: `writes_received`, and
`writes_duplicated` for a write identical to one received before (same method, path, query
and JSON body: the same activity, profile update or choice sent twice), so a client can
check that each write it had accepted reached mediarithmics exactly once.

Write faults (`POST /__sandbox/writes {"latency": 0.05, "slow_seconds": 18, "slow_count": 1}`):
every write waits `latency` seconds (reads do not), and the next `slow_count` writes take
`slow_seconds` to answer, as a slow upstream would.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from flask import jsonify, request

from .base import SandboxState, digest, sandbox_app

DEFAULT_TOKEN = "sandbox-mediarithmics-token"
DEFAULT_DATAMART = "1509"
BASE_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z in epoch milliseconds
TIERS = ["silver", "gold", "platinum"]
CITIES = ["Lyon", "Nantes", "Bordeaux", "Lille"]


def _ok(data: Any, status: int = 200):
    body: dict[str, Any] = {"status": "ok", "data": data}
    if isinstance(data, list):
        body.update({"count": len(data), "first_result": 0, "max_results": 50})
    return jsonify(body), status


def _error(status: int, message: str, code: str):
    return jsonify({"status": "error", "error": message, "error_code": code}), status


ACTIVITY_TYPES = {"TOUCH", "SITE_VISIT", "APP_VISIT", "EMAIL", "DISPLAY_AD", "USER_SCENARIO_NODE_ENTER"}


class Store:
    """User choices by (selector, processing id), seeded on first read; what was written."""

    def __init__(self) -> None:
        self.choices: dict[str, dict[str, dict[str, Any]]] = {}
        self.history: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.activities: list[dict[str, Any]] = []
        self.writes: list[tuple[str, str, dict[str, str], Any]] = []  # method, path, query, body
        self.identities: set[str] = set()  # digests of the writes received
        self.write_latency = 0.0
        self.slow_seconds = 0.0
        self.slow_count = 0
        self.lock = threading.Lock()

    def write_delay(self) -> float:
        """Seconds the current write waits before it is applied."""
        with self.lock:
            if self.slow_count > 0:
                self.slow_count -= 1
                return self.slow_seconds
            return self.write_latency

    def user_choices(self, selector: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            if selector not in self.choices:
                seed = digest(selector)
                self.choices[selector] = {
                    "101": {"$processing_id": "101", "$choice_ts": BASE_TS + seed % 10**9,
                            "$choice_acceptance_value": "optout" not in selector, "channel": "email"},
                    "102": {"$processing_id": "102", "$choice_ts": BASE_TS + seed % 10**8,
                            "$choice_acceptance_value": bool(seed & 1), "channel": "web"},
                }
                for pid, choice in self.choices[selector].items():
                    older = dict(choice, **{"$choice_ts": choice["$choice_ts"] - 86_400_000,
                                           "$choice_acceptance_value": not choice["$choice_acceptance_value"]})
                    oldest = dict(choice, **{"$choice_ts": choice["$choice_ts"] - 2 * 86_400_000})
                    # Stored out of order: the proxy must sort newest first.
                    self.history[(selector, pid)] = [older, dict(choice), oldest]
            return self.choices[selector]


def _deep_merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(old)
    for key, value in new.items():
        merged[key] = _deep_merge(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
    return merged


def _profile(selector: str) -> dict[str, Any]:
    seed = digest(selector, "profile")
    return {
        "$compartment_id": 1,
        "$user_account_id": f"acc-{seed % 100000}",
        "$creation_ts": BASE_TS - seed % 10**10,
        "$last_modified_ts": BASE_TS + seed % 10**9,
        "first_name": ["Léa", "Hugo", "Chloé", "Noah"][seed % 4],
        "loyalty": {"tier": TIERS[seed % 3], "points": seed % 5000},
        "address": {"city": CITIES[seed % 4], "zip-code": f"{69000 + seed % 999}"},
        "newsletter_topics": ["recipes", "offers"][: 1 + seed % 2],
    }


def make_app(token: str = DEFAULT_TOKEN, datamart_id: str = DEFAULT_DATAMART, state: SandboxState | None = None):
    state = state or SandboxState()
    app = sandbox_app("mediarithmics", state)
    store = Store()
    app.config["STORE"] = store

    @app.before_request
    def authenticate():
        if request.path.startswith("/__sandbox/"):
            return None
        if request.headers.get("Authorization") != token:
            return _error(401, "Authentication failed", "INVALID_TOKEN")
        if request.method in ("POST", "PUT"):
            delay = store.write_delay()
            if delay:
                time.sleep(delay)
        return None

    @app.post("/__sandbox/writes")
    def write_faults():
        body = request.get_json(silent=True) or {}
        with store.lock:
            store.write_latency = float(body.get("latency", store.write_latency))
            store.slow_seconds = float(body.get("slow_seconds", store.slow_seconds))
            store.slow_count = int(body.get("slow_count", store.slow_count))
        return jsonify({"ok": True})

    def check(datamart: str, selector: str):
        if datamart != datamart_id:
            return _error(403, f"no access to datamart {datamart}", "FORBIDDEN")
        values = [part.partition("=")[2] for part in selector.split(",")]
        if not all(values) or any(v.startswith("unknown") for v in values):
            return _error(404, "User point not found", "NOT_FOUND")
        return None

    prefix = "/v1/datamarts/<datamart>/user_points/<selector>"

    @app.get(prefix + "/user_profiles")
    def profiles(datamart: str, selector: str):
        failed = check(datamart, selector)
        if failed:
            return failed
        with store.lock:
            stored = [p for key, p in store.profiles.items() if key.startswith(selector + "|")]
        return _ok(stored or [_profile(selector)])

    def record(body: Any) -> None:
        identity = hashlib.sha256(json.dumps(
            [request.method, request.path, sorted(request.args.items(multi=True)), body],
            sort_keys=True).encode()).hexdigest()
        with store.lock:
            store.writes.append((request.method, request.path, dict(request.args), body))
            duplicate = identity in store.identities
            store.identities.add(identity)
        with state.lock:
            state.counters["writes_received"] += 1
            state.counters["writes_duplicated"] += int(duplicate)

    def forget_writes() -> None:
        with store.lock:
            store.identities.clear()

    state.on_reset.append(forget_writes)

    @app.post("/v1/datamarts/<datamart>/user_activities")
    def user_activities(datamart: str):
        if datamart != datamart_id:
            return _error(403, f"no access to datamart {datamart}", "FORBIDDEN")
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or body.get("$type") not in ACTIVITY_TYPES:
            return _error(400, f"Invalid activity: unknown $type {body.get('$type') if isinstance(body, dict) else None!r}",
                          "BAD_REQUEST")
        record(body)
        with store.lock:
            store.activities.append(body)
        return _ok({"$type": body["$type"]})

    @app.put(prefix + "/user_profiles/compartment_id=<compartment>/user_account_id=<account>")
    def put_profile(datamart: str, selector: str, compartment: str, account: str):
        failed = check(datamart, selector)
        if failed:
            return failed
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, "The body must be a user profile object", "BAD_REQUEST")
        record(body)
        key = f"{selector}|{compartment}|{account}"
        with store.lock:
            current = store.profiles.get(key, {})
            if request.args.get("force_replace") == "true":
                merged = dict(body)
            elif request.args.get("merge_objects") == "true":
                merged = _deep_merge(current, body)
            else:
                merged = {**current, **body}
            merged.update({"$compartment_id": compartment, "$user_account_id": account})
            store.profiles[key] = merged
        return _ok(merged)

    @app.put(prefix + "/user_choices/processing_id=<processing>")
    def put_choice(datamart: str, selector: str, processing: str):
        failed = check(datamart, selector)
        if failed:
            return failed
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("$choice_acceptance_value"), bool):
            return _error(400, "A user choice needs $choice_acceptance_value", "BAD_REQUEST")
        record(body)
        store.user_choices(selector)
        with store.lock:
            previous = store.choices[selector].get(processing, {})
            stamp = max(int(time.time() * 1000), (previous.get("$choice_ts") or 0) + 1)
            choice = {**previous, **body, "$processing_id": processing, "$choice_ts": stamp}
            store.choices[selector][processing] = choice
            store.history.setdefault((selector, processing), []).append(dict(choice))
        return _ok(choice)

    @app.get(prefix + "/user_choices")
    @app.get(prefix + "/user_choices/processing_id=<processing>")
    def choices(datamart: str, selector: str, processing: str | None = None):
        failed = check(datamart, selector)
        if failed:
            return failed
        found = store.user_choices(selector)
        return _ok([c for pid, c in found.items() if processing in (None, pid)])

    @app.get(prefix + "/user_choices/processing_id=<processing>/change_log")
    def change_log(datamart: str, selector: str, processing: str):
        failed = check(datamart, selector)
        if failed:
            return failed
        store.user_choices(selector)
        return _ok(list(store.history.get((selector, processing), [])))

    return app
