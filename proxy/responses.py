"""Turning results and errors into HTTP answers (JSON bytes plus cache headers)."""

from __future__ import annotations

import json
import math
from typing import Any

from flask import Response

from .cache import Lookup

JSON_TYPE = "application/json"  # JSON is UTF-8 by definition (RFC 8259): no charset needed


def json_bytes(body: Any) -> bytes:
    # ensure_ascii=False keeps Unicode values readable and the answer smaller.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(json_bytes(body), status=status, mimetype=JSON_TYPE)
    if headers:
        response.headers.update(headers)
    return response


def cache_headers(lookup: Lookup | None) -> dict[str, str]:
    """X-Cache says how the answer was obtained; max-age is what remains of its TTL."""
    if lookup is None:
        return {"Cache-Control": "no-store"}
    if lookup.state == "FALLBACK":
        return {"X-Cache": "FALLBACK", "Cache-Control": "no-store"}
    headers = {
        "X-Cache": {"HIT": "HIT", "STALE": "STALE"}.get(lookup.state, "MISS"),
        "Cache-Control": f"max-age={max(0, math.floor(lookup.max_age))}",
    }
    if lookup.age >= 1:
        headers["Age"] = str(int(lookup.age))
    return headers
