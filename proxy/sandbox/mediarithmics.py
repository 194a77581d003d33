"""Sandbox mediarithmics user point API: profiles and user choices (read and write).

Selector values starting with `unknown` are unknown user points (404). Others get a
deterministic profile and two choices: processing 101 (newsletter; refused when the
id contains `optout`) and 102 (personalised offers). Writes change what later reads
return, as the real API does.
"""

from __future__ import annotations

import threading
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


class Store:
    """User choices by (selector, processing id), seeded on first read."""

    def __init__(self) -> None:
        self.choices: dict[str, dict[str, dict[str, Any]]] = {}
        self.history: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

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
        return None

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
        return check(datamart, selector) or _ok([_profile(selector)])

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
