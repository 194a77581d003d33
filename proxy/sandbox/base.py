"""What every sandbox upstream shares: call counting, latency, a rate limit and injectable faults.

Control endpoints live under `/__sandbox/` (never part of the real APIs):
- `GET /__sandbox/stats` -> {"calls": n, "paths": {...}, "statuses": {"200": n, "429": n, ...},
  "counters": {...}}: `statuses` counts the answers given to API calls by HTTP status (a
  rejected call's 429 included), so a client can tell how many 429s an upstream answered.
- `POST /__sandbox/faults` {"mode": "<mode>", "seconds": 2, "count": null} -> the next `count`
  calls (all when null) misbehave. Modes: `slow`/`hang` (no answer for `seconds`), `error` (500),
  `ratelimit` (429, `Retry-After: seconds`, 30 by default), `unavailable` (503 with
  `Retry-After: seconds`), `reset`, `malformed`, `oversized`, `deep` (JSON nested 1,000
  levels), `out_of_range` (a number past a double's range), `lone_surrogate` (a string
  escaping half a UTF-16 pair: not encodable as UTF-8), `trickle_headers` (status line and headers one byte every `seconds`), `slow_body`
  (headers at once, then the body in 8-byte pieces `seconds` apart), `trickle` (headers at
  once, then the body one byte every `seconds`), `refuse` (400, as for an invalid write),
  `applied_not_json` (the call is handled, a write applied, then answered `200 OK` as plain
  text, as some gateways do), `forbidden` (403, as for a revoked credential), `none`.
- `POST /__sandbox/reset` clears counters and faults.
Images a sandbox serves for previews (`/images/...`) are not calls either.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from flask import Flask, Response, g, jsonify, request

from .server import RateWindow

# Control endpoints and the sandbox's own images (what a browser loads in a preview) are not
# API calls: never counted, delayed or faulted.
UNCOUNTED = ("/__sandbox/", "/images/")
FAULT_MODES = ("none", "slow", "hang", "error", "ratelimit", "reset", "malformed", "oversized",
               "unavailable", "deep", "trickle_headers", "slow_body", "trickle", "refuse", "applied_not_json",
               "out_of_range", "lone_surrogate", "forbidden")
# The body the dribbling faults send: valid JSON, 64 bytes, so a client that waited long
# enough would get a usable answer (the point is that it must not wait).
_DRIBBLED = b'{"pad": "' + b"x" * 53 + b'"}'



class SandboxState:
    """Mutable knobs of one sandbox server, safe to change from tests while it runs."""

    def __init__(self, latency: float = 0.0, rate_per_minute: int | None = None):
        self.latency = latency
        self.rate = RateWindow(rate_per_minute)
        self.calls = 0
        self.paths: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()  # answers to API calls by HTTP status
        self.counters: Counter[str] = Counter()  # sandbox-specific events (e.g. tracked assignments)
        self.last_uri = ""  # the request target exactly as sent, before any decoding
        self.last_request_id = ""  # X-Request-Id of the last call, to check it is forwarded
        self.fault = "none"
        self.fault_seconds = 0.0
        self.retry_after: str | None = None  # a literal Retry-After for 429/503 faults (e.g. "inf")
        self.fault_count: int | None = None
        self.lock = threading.Lock()
        self.on_reset: list[Callable[[], None]] = []  # sandbox-specific state to restore too

    def record(self, path: str) -> str:
        """Count a call and say which fault (if any) applies to it."""
        with self.lock:
            self.calls += 1
            self.paths[path] += 1
            fault = self.fault
            if fault != "none" and self.fault_count is not None:
                self.fault_count -= 1
                if self.fault_count <= 0:
                    self.fault, self.fault_count = "none", None
            return fault

    def set_fault(self, mode: str, seconds: float = 0.0, count: int | None = None) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault {mode!r}")
        with self.lock:
            self.fault, self.fault_seconds, self.fault_count = mode, seconds, count

    def reset(self) -> None:
        with self.lock:
            self.calls = 0
            self.paths.clear()
            self.statuses.clear()
            self.counters.clear()
            self.last_uri = ""
            self.fault, self.fault_count = "none", None
            self.retry_after = None
        for restore in self.on_reset:
            restore()


def _broken_stream():
    # Start a body, then fail: the server drops the connection mid-answer.
    yield b'{"partial": '
    raise ConnectionResetError("sandbox: injected connection reset")


def _route_on_raw_path(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """Route as the real APIs do: an id's encoded slash (`%2F`) stays inside its path segment.
    Werkzeug decodes it before routing, so `user_agent_id=%2F` became a path of its own (a 308)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        raw = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "").split("?", 1)[0]
        if re.search("%2f", raw, re.IGNORECASE):
            decoded = "%2F".join(unquote(part) for part in re.split("%2f", raw, flags=re.IGNORECASE))
            environ["PATH_INFO"] = decoded.encode().decode("latin-1")  # WSGI strings are latin-1
        return wsgi_app(environ, start_response)

    return app


def sandbox_app(name: str, state: SandboxState) -> Flask:
    """A Flask app with the shared control endpoints and per-call behaviour hooks."""
    app = Flask(f"sandbox_{name}")
    app.config["SANDBOX"] = state
    app.wsgi_app = _route_on_raw_path(app.wsgi_app)  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented key order

    @app.get("/__sandbox/stats")
    def stats():
        with state.lock:
            return jsonify(
                {"calls": state.calls, "paths": dict(state.paths), "statuses": dict(state.statuses),
                 "counters": dict(state.counters)}
            )

    @app.post("/__sandbox/faults")
    def faults():
        body = request.get_json(silent=True) or {}
        try:
            state.set_fault(body.get("mode", "none"), float(body.get("seconds", 0)), body.get("count"))
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"ok": True})

    @app.post("/__sandbox/config")
    def configure():
        body = request.get_json(silent=True) or {}
        if "latency" in body:
            state.latency = float(body["latency"])
        return jsonify({"ok": True, "latency": state.latency})

    @app.post("/__sandbox/reset")
    def reset():
        state.reset()
        return jsonify({"ok": True})

    @app.before_request
    def behave() -> Any:
        if request.path.startswith(UNCOUNTED):
            return None
        fault = g.fault = state.record(request.path)
        state.last_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI", "")
        state.last_request_id = request.headers.get("X-Request-Id", "")
        if state.latency:
            time.sleep(state.latency)
        if fault == "slow":
            time.sleep(state.fault_seconds or 2.0)
        elif fault == "hang":
            time.sleep(state.fault_seconds or 30.0)
        elif fault == "error":
            return Response('{"error":"internal error"}', 500, mimetype="application/json")
        elif fault == "ratelimit":
            return _too_many(int(state.fault_seconds) or 30)
        elif fault == "unavailable":
            response = jsonify({"error": "service unavailable"})
            response.status_code = 503
            response.headers["Retry-After"] = state.retry_after or str(int(state.fault_seconds) or 30)
            return response
        elif fault == "deep":
            return Response(b'{"userData": ' + b"[" * 1000 + b"]" * 1000 + b"}", 200,
                            mimetype="application/json")
        elif fault == "trickle_headers":
            return _trickle_headers(request.environ, state.fault_seconds or 1.0)
        elif fault in ("slow_body", "trickle"):
            piece = 8 if fault == "slow_body" else 1
            return Response(_dribble(_DRIBBLED, piece, state.fault_seconds or 1.0), 200,
                            headers={"Content-Length": str(len(_DRIBBLED))},
                            mimetype="application/json")
        elif fault == "reset":
            return Response(_broken_stream(), 200, mimetype="application/json")
        elif fault == "forbidden":
            return Response('{"error":"forbidden"}', 403, mimetype="application/json")
        elif fault == "refuse":
            return Response('{"error":"refused by the sandbox"}', 400, mimetype="application/json")
        elif fault == "malformed":
            return Response('{"userData": {"recommendations": [', 200, mimetype="application/json")
        elif fault == "out_of_range":
            return Response(b'{"userData": {"x": 1e400}, "x": -1e999}', 200, mimetype="application/json")
        elif fault == "lone_surrogate":
            return Response(b'{"userData": {"x": "\\ud800"}, "x": "\\ud800"}', 200, mimetype="application/json")
        elif fault == "oversized":
            return Response(b'{"pad": "' + b"x" * 3_000_000 + b'"}', 200, mimetype="application/json")
        wait = state.rate.retry_after()
        if wait is not None:
            return _too_many(wait)
        return None

    @app.after_request
    def count_status(response: Response) -> Response:
        if g.get("fault") == "applied_not_json" and response.status_code < 300:
            response = Response(b"OK", 200, mimetype="text/plain")
        if not request.path.startswith(UNCOUNTED):
            with state.lock:
                state.statuses[str(response.status_code)] += 1
        return response

    return app


def _dribble(body: bytes, piece: int, interval: float):
    # Each piece arrives well within any per-read timeout; the whole takes len/piece intervals.
    for start in range(0, len(body), piece):
        time.sleep(interval)
        yield body[start:start + piece]


def _trickle_headers(environ: dict, interval: float) -> Response:
    """Write a whole answer on the raw socket, its status line and headers one byte at a time,
    then close: the server's own answer afterwards finds the connection gone."""
    sock = environ["werkzeug.socket"]
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_DRIBBLED))
    try:
        for i in range(len(head)):
            sock.sendall(head[i:i + 1])
            time.sleep(interval)
        sock.sendall(_DRIBBLED)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client gave up, as it should
    return Response(b"", 200)


def _too_many(seconds: int) -> Response:
    response = jsonify({"error": "Number of requests per minute exceeds system limit. Contact Support for higher limit."})
    response.status_code = 429
    response.headers["Retry-After"] = str(seconds)
    return response


def digest(*parts: str) -> int:
    """A stable integer from strings: the same id always gets the same sandbox data."""
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def pick(seed: int, pool: list[Any], count: int) -> list[Any]:
    """`count` distinct elements of `pool`, chosen deterministically by `seed`."""
    remaining, chosen = list(pool), []
    for _ in range(min(count, len(remaining))):
        seed, index = divmod(seed, len(remaining)) if seed else (0, 0)
        seed = seed * 2654435761 % (2**61 - 1) + 1
        chosen.append(remaining.pop(index))
    return chosen
