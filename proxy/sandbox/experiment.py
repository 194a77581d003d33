"""Sandbox Amplitude Experiment: the Evaluation API (`GET /v1/vardata`) and the Flags API
(`GET /sdk/v2/flags?v=0`), both answering from the same flag configurations in the real
format, evaluated with the official engine (`amplitude-experiment`): remote and local
evaluation agree by construction, while the proxy's two code paths differ.
`POST /__sandbox/flags` replaces the configurations (`null`: the defaults; a reset restores them);
`POST /__sandbox/flags/fail {"status": 500}` makes the Flags API alone fail.

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

from .base import SandboxState, sandbox_app

DEFAULT_KEY = "sandbox-experiment-deployment-key"

ARMS: dict[str, list[dict[str, Any]]] = {
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
OFF = {"key": "off", "metadata": {"default": True}}
DISTRIBUTION_MAX = 42949673  # the Flags API's distribution space (hash // 100)


def _who_matches(pattern: str) -> list[list[dict[str, Any]]]:
    """Conditions: the user id matches, or there is no user id and the device id matches."""
    user, device = ["context", "user", "user_id"], ["context", "user", "device_id"]
    return [
        [{"selector": user, "op": "regex match", "values": [pattern]}],
        [{"selector": user, "op": "is", "values": ["(none)"]},
         {"selector": device, "op": "regex match", "values": [pattern]}],
    ]


def _even_bucket(key: str, field: str, arms: list[str]) -> dict[str, Any]:
    step = DISTRIBUTION_MAX // len(arms)
    return {"selector": ["context", "user", field], "salt": f"{key}-salt", "allocations": [{
        "range": [0, 100], "distributions": [
            {"variant": arm, "range": [i * step, DISTRIBUTION_MAX if i == len(arms) - 1 else (i + 1) * step]}
            for i, arm in enumerate(arms)]}]}


def _flag(key: str, variants: list[dict[str, Any]], segments: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": key,
        "metadata": {"deployed": True, "evaluationMode": "local", "flagType": "experiment", "flagVersion": 1},
        "segments": segments,
        "variants": {"off": OFF, **{v["key"]: {**v, "value": v["key"]} for v in variants}},
    }


def default_flags() -> list[dict[str, Any]]:
    """The sandbox's flags as the Flags API configures them: ids matching `^outsider` are
    outside every audience, ids containing `treatment`/`control` get that arm, others are
    bucketed on the user id (the device id without one); premium-upsell is `on` for users
    whose `premium` user property is true."""
    flags = []
    for key, arms in ARMS.items():
        names = [arm["key"] for arm in arms]
        flags.append(_flag(key, arms, [
            {"conditions": _who_matches("^outsider"), "variant": "off"},
            {"conditions": _who_matches("treatment"), "variant": names[-1]},
            {"conditions": _who_matches("control"), "variant": names[0]},
            {"conditions": [[{"selector": ["context", "user", "user_id"], "op": "is not", "values": ["(none)"]}]],
             "bucket": _even_bucket(key, "user_id", names)},
            {"bucket": _even_bucket(key, "device_id", names), "metadata": {"segmentName": "All Other Users"}},
        ]))
    flags.append(_flag(PREMIUM_FLAG, [PREMIUM_VARIANT], [
        {"conditions": _who_matches("^outsider"), "variant": "off"},
        {"conditions": [[{"selector": ["context", "user", "user_properties", "premium"], "op": "is",
                          "values": ["true"]}]], "variant": "on"},
        {"variant": "off", "metadata": {"segmentName": "All Other Users"}},
    ]))
    return flags


def warm() -> None:
    """Import the engine now (tests): a first evaluation on a busy machine must not spend
    the proxy's deadline importing it."""
    evaluate(parse(default_flags()), {"user_id": "warm"}, [])


def parse(flags: list[dict[str, Any]]) -> dict[str, Any]:
    from amplitude_experiment.evaluation.types import EvaluationFlag

    return {f["key"]: EvaluationFlag.from_dict(f) for f in flags}


def evaluate(parsed: dict[str, Any], user: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    """What `/v1/vardata` answers, from the same configurations with the official engine."""
    from amplitude_experiment.evaluation.engine import EvaluationEngine
    from amplitude_experiment.evaluation.topological_sort import topological_sort

    results = EvaluationEngine().evaluate({"user": user}, topological_sort(parsed, wanted or None))
    answer: dict[str, Any] = {}
    for key, variant in results.items():
        metadata = variant.metadata or {}
        if (wanted and key not in wanted) or metadata.get("default") or metadata.get("deployed") is False:
            continue
        answer[key] = {"key": variant.key, **({"payload": variant.payload} if variant.payload is not None else {})}
    return answer


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


class _Flags:
    """The configurations both endpoints answer from (replaceable by tests)."""

    def __init__(self) -> None:
        self.set(default_flags())
        self.failing = 0  # an HTTP status the Flags API answers instead (0: none)

    def set(self, flags: list[dict[str, Any]]) -> None:
        self.current = flags
        self._parsed: tuple[list[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def parsed(self) -> dict[str, Any]:
        # Parsed on first use: `ccproxy demo` runs the sandboxes in the gunicorn master, which
        # must not import the SDK before it forks its workers.
        current, cached = self.current, self._parsed
        if cached is None or cached[0] is not current:  # never a parse of replaced flags
            cached = self._parsed = (current, parse(current))
        return cached[1]

    def restore(self) -> None:
        self.set(default_flags())
        self.failing = 0


def make_app(deployment_key: str = DEFAULT_KEY, state: SandboxState | None = None):
    state = state or SandboxState()
    app = sandbox_app("experiment", state)
    flags = _Flags()
    state.on_reset.append(flags.restore)

    @app.get("/images/<name>.svg")
    def image(name: str):
        if name not in IMAGES:
            abort(404)
        return Response(_banner_svg(*IMAGES[name]), mimetype="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/sdk/v2/flags")
    def flag_configs():
        if request.headers.get("Authorization", "") != f"Api-Key {deployment_key}":
            return jsonify({"error": "Invalid or missing deployment key"}), 401
        if flags.failing:
            return jsonify({"error": "flag configurations unavailable"}), flags.failing
        return jsonify([{**flag, "variants": {k: _with_image_urls(v) for k, v in flag["variants"].items()}}
                        for flag in flags.current])

    @app.post("/__sandbox/flags")
    def set_flags():
        """Replace the flag configurations (a JSON list; `null` restores the defaults)."""
        body = request.get_json(silent=True)
        flags.set(default_flags() if body is None else list(body))
        return jsonify({"ok": True, "flags": len(flags.current)})

    @app.post("/__sandbox/flags/fail")
    def fail_flags():
        """`{"status": 500}`: the Flags API alone answers that status (0: answers again)."""
        flags.failing = int((request.get_json(silent=True) or {}).get("status", 0))
        return jsonify({"ok": True, "status": flags.failing})

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
        wanted = [f for f in request.args.get("flag_keys", "").split(",") if f]
        user = {k: v for k, v in context.items() if v is not None}
        for name in ("user_id", "device_id"):
            if request.args.get(name):
                user[name] = request.args[name]
        if not user.get("user_id") and not user.get("device_id"):
            return jsonify({})
        answer = {k: _with_image_urls(v) for k, v in evaluate(flags.parsed, user, wanted).items()}
        if request.headers.get("X-Amp-Exp-Track") != "no-track":
            state.counters["assignments_tracked"] += len(answer)
        return jsonify(answer)

    return app
