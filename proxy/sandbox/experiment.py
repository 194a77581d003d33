"""Sandbox Amplitude Experiment Evaluation API (`GET /v1/vardata`).

Flags: `checkout-button` (control/treatment, treatment has a payload),
`hero-banner` (spring-sale/summer-sale, both with payloads), `premium-upsell` (only
for users whose context says `user_properties.premium` is true). Ids containing
`control` or `treatment` always get that arm; ids starting with `outsider` are outside
every audience (`{}`). Each call without `X-Amp-Exp-Track: no-track` counts one
tracked assignment per assigned flag (`/__sandbox/stats` counters).

The hero banners' images are served by this sandbox (`GET /images/<name>.svg`) and the
payloads point at them on the host the call came to, so previews show them offline.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, abort, jsonify, request

from .base import SandboxState, digest, sandbox_app

DEFAULT_KEY = "sandbox-experiment-deployment-key"

FLAGS: dict[str, list[dict[str, Any]]] = {
    "checkout-button": [
        {"key": "control"},
        {"key": "treatment", "payload": {"color": "#1a7f37", "label-text": "Buy now"}},
    ],
    "hero-banner": [
        {"key": "spring-sale", "payload": {
            "headline": "Spring picks are in", "image_url": "/images/spring-sale.svg",
            "cta-url": "https://shop.example.com/spring", "cta_text": "Shop spring"}},
        {"key": "summer-sale", "payload": {
            "headline": "Summer sale: up to 40% off", "image_url": "/images/summer-sale.svg",
            "cta-url": "https://shop.example.com/summer", "cta_text": "Shop the sale"}},
    ],
}
PREMIUM_FLAG = "premium-upsell"
PREMIUM_VARIANT = {"key": "on", "payload": {"discount_percent": 15}}
# name -> (background, text) of the 600x200 banner images the payloads point at.
IMAGES = {"spring-sale": ("#d8f3dc", "Spring picks are in"), "summer-sale": ("#ffd166", "Summer sale: up to 40% off")}


def _banner_svg(background: str, text: str) -> str:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="600" height="200" viewBox="0 0 600 200">'
        f'<rect width="600" height="200" fill="{background}"/>'
        '<text x="300" y="112" font-family="Arial, Helvetica, sans-serif" font-size="34" '
        f'font-weight="bold" text-anchor="middle" fill="#1f2328">{text}</text></svg>'
    )


def _with_image_urls(variant: dict[str, Any]) -> dict[str, Any]:
    """The variant with its payload's image path made absolute on the host that was called."""
    payload = variant.get("payload")
    if not isinstance(payload, dict) or not str(payload.get("image_url", "")).startswith("/"):
        return variant
    base = request.host_url.rstrip("/")
    return {**variant, "payload": {**payload, "image_url": base + payload["image_url"]}}


def _assign(who: str, flag: str) -> dict[str, Any]:
    arms = FLAGS[flag]
    if "treatment" in who:
        return arms[-1]
    if "control" in who:
        return arms[0]
    return arms[digest(who, flag) % len(arms)]


def make_app(deployment_key: str = DEFAULT_KEY, state: SandboxState | None = None):
    state = state or SandboxState()
    app = sandbox_app("experiment", state)

    @app.get("/images/<name>.svg")
    def image(name: str):
        if name not in IMAGES:
            abort(404)
        return Response(_banner_svg(*IMAGES[name]), mimetype="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/v1/vardata")
    def vardata():
        if request.headers.get("Authorization", "") != f"Api-Key {deployment_key}":
            return jsonify({"error": "Invalid or missing deployment key"}), 401
        raw_context = request.args.get("context")
        try:
            context = json.loads(raw_context) if raw_context else {}
        except ValueError:
            return jsonify({"error": "Invalid JSON in context"}), 400
        if not isinstance(context, dict):
            return jsonify({"error": "context must be a JSON object"}), 400
        who = request.args.get("user_id") or request.args.get("device_id") or context.get("user_id") or ""
        wanted = [f for f in request.args.get("flag_keys", "").split(",") if f]
        if not who or who.startswith("outsider"):
            return jsonify({})
        premium = (context.get("user_properties") or {}).get("premium") is True
        answer: dict[str, Any] = {}
        for flag in wanted or [*FLAGS, PREMIUM_FLAG]:
            if flag in FLAGS:
                answer[flag] = _with_image_urls(_assign(who, flag))
            elif flag == PREMIUM_FLAG and premium:
                answer[flag] = PREMIUM_VARIANT
        if request.headers.get("X-Amp-Exp-Track") != "no-track":
            state.counters["assignments_tracked"] += len(answer)
        return jsonify(answer)

    return app
