"""Inbound API keys: `Authorization: Bearer <key>`, `X-Api-Key: <key>`, or HTTP Basic with the
key as password and any user name (Braze's `:basic_auth`). Compared in constant time;
several keys may be valid at once so they can be rotated."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from typing import Any, Protocol

from .errors import Unauthorized

# Load balancers probe the first two without credentials; recipients' mail clients and
# browsers load the pixel and open consent links (those are trusted by their signature).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v1/mediarithmics/pixel.gif", "/v1/mediarithmics/consent"})


class Headers(Protocol):
    """What auth reads of a request: Flask's headers, or the WSGI environ's."""

    def get(self, name: str, default: Any = None) -> Any: ...

    def __getitem__(self, name: str) -> Any: ...


def parse_keys(raw: str) -> list[str]:
    return [key.strip() for key in raw.split(",") if key.strip()]


def presented_key(headers: Headers) -> str | None:
    """The key a caller sent, in whichever of the accepted forms."""
    if headers.get("X-Api-Key"):
        return headers["X-Api-Key"]
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def key_is_valid(presented: str | None, keys: Iterable[str]) -> bool:
    if not presented:
        return False
    candidate = presented.encode()
    # Check every key, so timing says nothing about which one (or whether one) matched.
    matches = [hmac.compare_digest(candidate, key.encode()) for key in keys]
    return any(matches)


def check(path: str, headers: Headers, keys: list[str]) -> None:
    """Raise Unauthorized unless the request may proceed."""
    if not keys or path in OPEN_PATHS:
        return
    if not key_is_valid(presented_key(headers), keys):
        raise Unauthorized("a valid API key is required (Bearer, X-Api-Key or Basic password)")
