"""Inbound API keys: `Authorization: Bearer <key>`, `X-Api-Key: <key>`, or HTTP Basic with the
key as password and any user name (Braze's `:basic_auth`). Compared in constant time;
several keys may be valid at once so they can be rotated."""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from .errors import Unauthorized

View = TypeVar("View", bound=Callable[..., Any])
OPEN = "ccproxy_open"  # the attribute `open_to_all` sets on a view


def open_to_all(view: View) -> View:
    """Mark a route as answered without an API key: load balancers' probes, and what
    recipients' mail clients and browsers load (the pixel, consent links: trusted by their
    signature). The app derives its open paths from the views so marked."""
    setattr(view, OPEN, True)
    return view


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
        except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
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


def check(path: str, headers: Headers, keys: list[str], open_paths: frozenset[str] = frozenset()) -> None:
    """Raise Unauthorized unless the request may proceed (`open_paths` need no key)."""
    if not keys or path in open_paths:
        return
    if not key_is_valid(presented_key(headers), keys):
        raise Unauthorized("a valid API key is required (Bearer, X-Api-Key or Basic password)")
