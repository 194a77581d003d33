"""Sandbox Amplitude User Profile API (`GET /v1/userprofile`), as documented in the seed.

- `testUser` / device `ffff-ffff-ffff-ffff`: the seed's example answers, to the byte.
- ids starting with `unknown`: `{"error": "User id and device id not seen before"}`.
- ids starting with `inactive`: `"recommendations": null` (inactive for over 90 days).
- any other id: deterministic data derived from the id.
- 401 `Missing Api-Key in Authorization header` / `Invalid Api-Key`; empty 404 on other paths;
  429 with Retry-After above the configured rate.
- `POST /2/httpapi`: Amplitude's HTTP V2 API, recording events (`sandbox/analytics.py`).
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from . import analytics
from .base import SandboxState, digest, pick, sandbox_app

DEFAULT_KEY = "sandbox-amplitude-secret"
TEST_USER, TEST_DEVICE = "testUser", "ffff-ffff-ffff-ffff"

SEED_RECS = {
    "testRecId": {
        "rec_id": "testRecId",
        "child_rec_id": "testRecId",
        "items": ["cookie", "cracker", "chocolate milk", "donut", "croissant"],
        "is_control": False,
        "recommendation_source": "model",
        "last_updated": 1608670720,
    },
    "testRecId2": {
        "rec_id": "testRecId2",
        "child_rec_id": "testRecId2",
        "items": ["bulgogi", "bibimbap", "kimchi", "croffles", "samgyeopsal"],
        "is_control": False,
        "recommendation_source": "model2",
        "last_updated": 1608670658,
    },
}
SEED_PROPS = {
    "library": "http/1.0",
    "first_used": "2020-01-13",
    "last_used": "2021-03-24",
    "number_property": 12,
    "boolean_property": True,
}
SEED_COHORTS = ["cohort1", "cohort3", "cohort7"]
SEED_COMPUTATIONS = {"computed-prop-1": "5000000.0", "computed-prop-2": "3"}
# comp_id -> the computation it names (the seed: testCompId answers computed-prop-2).
COMP_IDS = {"testCompId": "computed-prop-2", "testCompId1": "computed-prop-1"}

CATALOGUE = [
    "espresso", "croissant", "bagel", "matcha latte", "baguette", "pain au chocolat",
    "cinnamon roll", "scone", "brioche", "macaron", "churros", "mochi", "bao", "empanada",
    "pretzel", "crêpe", "strudel", "baklava", "onigiri", "focaccia",
]
CITIES = ["Paris", "São Paulo", "Zürich", "Tōkyō", "Seoul", "Lagos", "Montréal"]
PLANS = ["free", "plus", "premium"]
COHORT_POOL = [f"cohort{n}" for n in range(1, 10)]


def _user_data(user_id: str, device_id: str) -> dict[str, Any]:
    """The fixed part of a user's answer: resolved ids."""
    if user_id == TEST_USER or device_id == TEST_DEVICE:
        return {"user_id": user_id or TEST_USER, "device_id": device_id or TEST_DEVICE}
    seed = digest(user_id or device_id)
    device = device_id or "-".join(f"{(seed >> s) & 0xFFFF:04x}" for s in (0, 16, 32, 48))
    return {"user_id": user_id or None, "device_id": device}


def _is_test(user_id: str, device_id: str) -> bool:
    return user_id == TEST_USER or (not user_id and device_id == TEST_DEVICE)


def _recommendation(who: str, rec_id: str, rec_type: str | None, test: bool) -> dict | None:
    if rec_id.startswith("missing"):
        return None
    if test and rec_id in SEED_RECS and rec_type != "random":
        return dict(SEED_RECS[rec_id])
    seed = digest(who, rec_id, rec_type or "")
    random_recs = rec_type == "random"
    return {
        "rec_id": rec_id,
        "child_rec_id": rec_id,
        "items": pick(seed, CATALOGUE, 5),
        # rec_type overrides the experiment control (seed doc): never control then.
        "is_control": rec_type is None and seed % 10 == 0,
        "recommendation_source": "random" if random_recs else "model",
        "last_updated": 1700000000 + seed % 10_000_000,
    }


def _props(who: str) -> dict[str, Any]:
    seed = digest(who, "props")
    return {
        "library": "http/1.0",
        "first_used": f"2023-{1 + seed % 12:02d}-{1 + seed % 28:02d}",
        "last_used": f"2025-{1 + seed % 12:02d}-{1 + (seed >> 8) % 28:02d}",
        "number_property": seed % 100,
        "boolean_property": bool(seed & 1),
        "plan": PLANS[seed % len(PLANS)],
        "city": CITIES[seed % len(CITIES)],
    }


def _computations(who: str) -> dict[str, str]:
    seed = digest(who, "computations")
    return {"computed-prop-1": f"{seed % 10_000_000}.0", "computed-prop-2": str(seed % 10)}


def make_app(secret_key: str = DEFAULT_KEY, state: SandboxState | None = None):
    state = state or SandboxState()
    app = sandbox_app("amplitude", state)
    analytics.register(app, state)  # the HTTP V2 API (exposure events), on the same sandbox

    @app.errorhandler(404)
    def empty_404(_error):
        return Response(b"", 404)

    @app.get("/v1/userprofile")
    def userprofile():
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Api-Key "):
            return Response("Missing Api-Key in Authorization header", 401, mimetype="text/plain")
        if auth[len("Api-Key "):] != secret_key:
            return Response("Invalid Api-Key", 401, mimetype="text/plain")

        args = request.args
        user_id, device_id = args.get("user_id", ""), args.get("device_id", "")
        if not user_id and not device_id:
            return jsonify({"error": "user_id or device_id is required"}), 400
        if (user_id or device_id).startswith("unknown"):
            return jsonify({"error": "User id and device id not seen before"})

        test = _is_test(user_id, device_id)
        who = user_id or device_id
        data: dict[str, Any] = {"recommendations": None, **_user_data(user_id, device_id)}
        data.update({"amp_props": None, "cohort_ids": None})

        if args.get("get_recs") == "true":
            rec_ids = [r for r in args.get("rec_id", "").split(",") if r]
            if not rec_ids:
                return jsonify({"error": "rec_id is required when get_recs is true"}), 400
            if not who.startswith("inactive"):
                recs = [_recommendation(who, r, args.get("rec_type"), test) for r in rec_ids]
                data["recommendations"] = [r for r in recs if r]

        props: dict[str, Any] = {}
        if args.get("get_amp_props") == "true":
            props.update(SEED_PROPS if test else _props(who))
        comps = SEED_COMPUTATIONS if test else _computations(who)
        if args.get("get_computations") == "true":
            props.update(comps)
        elif args.get("comp_id") in COMP_IDS:
            name = COMP_IDS[args["comp_id"]]
            props[name] = comps[name]
        if props:
            data["amp_props"] = props

        if args.get("get_cohort_ids") == "true":
            data["cohort_ids"] = (
                list(SEED_COHORTS) if test else sorted(pick(digest(who, "c"), COHORT_POOL, digest(who) % 4))
            )
        # Key order as in the seed examples.
        ordered = {k: data[k] for k in ("recommendations", "user_id", "device_id", "amp_props", "cohort_ids")}
        return jsonify({"userData": ordered})

    return app
