"""Sandbox Amplitude HTTP V2 API (`POST /2/httpapi`), served by the Amplitude sandbox: it
records the events it receives, as Amplitude documents the API.

- 200 `{"code": 200, "events_ingested", "payload_size_bytes", "server_upload_time"}`;
- 400 `Invalid API key: ...` for another key, `missing_field` for a body without `api_key` or
  `events`, `events_with_missing_fields` for events without `event_type` or an id,
  `events_with_invalid_id_lengths` for ids shorter than 5 characters (or `options.min_id_length`);
- Amplitude drops an event whose `insert_id` it saw for the same user or device (7 days):
  `GET /__sandbox/events` lists every event received (`events`) and how many were
  ingested, i.e. not such duplicates (`ingested`). A reset forgets them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Flask, jsonify, request

from .base import SandboxState

DEFAULT_API_KEY = "sandbox-amplitude-analytics-api-key"


def register(app: Flask, state: SandboxState, api_key: str = DEFAULT_API_KEY) -> None:
    received: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def forget() -> None:
        with lock:
            received.clear()
            seen.clear()

    state.on_reset.append(forget)

    @app.post("/2/httpapi")
    def httpapi():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify({"code": 400, "error": "Invalid JSON request body"}), 400
        for name in ("api_key", "events"):
            if name not in body:
                return jsonify({"code": 400, "error": "Request missing required field",
                                "missing_field": name}), 400
        if body["api_key"] != api_key:
            return jsonify({"code": 400, "error": "Invalid API key: " + "*" * 8}), 400
        events = body["events"] if isinstance(body["events"], list) else []
        missing: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            if not isinstance(event, dict) or not event.get("event_type"):
                missing.setdefault("event_type", []).append(index)
            elif not event.get("user_id") and not event.get("device_id"):
                missing.setdefault("user_id", []).append(index)
        if missing:
            return jsonify({"code": 400, "error": "Request missing required field",
                            "events_with_missing_fields": missing}), 400
        # Ids shorter than 5 characters are refused unless `options.min_id_length` says less.
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        shortest = int(options.get("min_id_length") or 5)
        short = {name: [i for i, e in enumerate(events) if e.get(name) and len(str(e[name])) < shortest]
                 for name in ("user_id", "device_id")}
        if any(short.values()):
            return jsonify({"code": 400, "error": "Invalid id length for user_id or device_id",
                            "events_with_invalid_id_lengths": short}), 400
        ingested = 0
        with lock:
            for event in events:
                received.append(event)
                dedup = (str(event.get("user_id") or event.get("device_id")), str(event.get("insert_id")))
                if event.get("insert_id") is None or dedup not in seen:
                    seen.add(dedup)
                    ingested += 1
            state.counters["events_received"] += len(events)
            state.counters["events_ingested"] += ingested
        return jsonify({"code": 200, "events_ingested": ingested,
                        "payload_size_bytes": request.content_length or 0,
                        "server_upload_time": int(time.time() * 1000)})

    @app.get("/__sandbox/events")
    def events():
        with lock:
            return jsonify({"events": list(received), "ingested": len(seen)})
