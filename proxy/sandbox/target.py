"""Sandbox Adobe Target Profile API (`GET /rest/v1/profiles/<tntid>` and `/thirdPartyId/<id>`).

The seed's ids (`111492025094307-353046`, `a1-mbox3rdPartyId`) share one gold-member
profile; ids starting with `unknown` or `expired` get the documented 404 answers;
any other id gets a deterministic profile. With a token configured, calls must send
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify, request

from .base import SandboxState, digest, sandbox_app

DEFAULT_CLIENT = "sandbox"
SEED_TNTID, SEED_THIRD_PARTY = "111492025094307-353046", "a1-mbox3rdPartyId"
LEVELS = ["bronze", "silver", "gold", "platinum"]
CATEGORIES = ["shoes", "outdoor", "kitchen", "books", "beauty"]


def _profile(client: str, tntid: str, third_party_id: str, seed: int) -> dict[str, Any]:
    stamp = f"2025-0{1 + seed % 9}-1{seed % 10}T10:2{seed % 10}:00.000Z"
    level = "gold" if seed == 0 else LEVELS[seed % len(LEVELS)]
    points = "2450" if seed == 0 else str(seed % 5000)
    return {
        "client": client,
        "visitorId": {"tntId": tntid, "thirdPartyId": third_party_id, "marketingCloudVisitorId": None},
        "modifiedAt": stamp,
        "profileAttributes": {
            "user.memberlevel": {"value": level, "modifiedAt": stamp},
            "user.points": {"value": points, "modifiedAt": stamp},
            "favoriteCategory": {"value": CATEGORIES[seed % len(CATEGORIES)], "modifiedAt": stamp},
            "first-name": {"value": "Camille" if seed == 0 else "Alex", "modifiedAt": stamp},
        },
    }


def make_app(client_code: str = DEFAULT_CLIENT, token: str = "", state: SandboxState | None = None):
    state = state or SandboxState()
    app = sandbox_app("target", state)

    @app.get("/rest/v1/profiles/<path:rest>")
    def profiles(rest: str):
        if token and request.headers.get("Authorization") != f"Bearer {token}":
            return jsonify({"status": 401, "message": "Authentication failed"}), 401
        client = request.args.get("client", "")
        by_third_party = rest.startswith("thirdPartyId/")
        ident = rest[len("thirdPartyId/"):] if by_third_party else rest
        if client != client_code or not ident or ident.startswith(("unknown", "expired")):
            message = (
                f"No profile found for client {client} with third party id={ident}"
                if by_third_party
                else f"No profile found for client {client} with mboxPC={ident}"
            )
            return jsonify({"status": 404, "message": message}), 404
        if ident in (SEED_TNTID, SEED_THIRD_PARTY):
            return jsonify(_profile(client, SEED_TNTID, SEED_THIRD_PARTY, 0))
        seed = digest(ident) or 1
        tntid = ident if not by_third_party else f"{seed % 10**15}-{seed % 10**6:06d}"
        return jsonify(_profile(client, tntid, ident if by_third_party else "", seed))

    return app
