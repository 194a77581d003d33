"""Signed links for email footers and pixels: HMAC-SHA256 over the path and every
parameter, expiry included, with the server's `CCPROXY_LINK_SECRET`. A recipient clicks
them without an API key, so the signature is the only thing that makes them trusted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from .errors import LinkError  # raised here; kept importable as links.LinkError

SIGNATURE = "sig"
EXPIRES = "exp"



def _canonical(path: str, params: Mapping[str, str]) -> bytes:
    pairs = sorted((k, v) for k, v in params.items() if k != SIGNATURE)
    return (path + "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)).encode()


def sign(secret: str, path: str, params: Mapping[str, str]) -> str:
    digest = hmac.new(secret.encode(), _canonical(path, params), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed_query(secret: str, path: str, params: Mapping[str, str], expires_at: int) -> str:
    """The query string of a signed link (parameters, `exp`, then `sig`)."""
    signed = {**params, EXPIRES: str(int(expires_at))}
    return urlencode({**signed, SIGNATURE: sign(secret, path, signed)})


def verify(secret: str, path: str, params: Mapping[str, str], now: float | None = None) -> None:
    """Raise LinkError unless the link was signed by us, unaltered, and not expired."""
    given = params.get(SIGNATURE, "")
    if not secret or not given:
        raise LinkError("This link is not valid.")
    # Bytes: a non-ASCII signature is simply wrong (str compare_digest would raise).
    if not hmac.compare_digest(given.encode(), sign(secret, path, params).encode()):
        raise LinkError("This link is not valid: it was changed or is incomplete.")
    try:
        expires_at = int(params.get(EXPIRES, ""))
    except ValueError:
        raise LinkError("This link is not valid.") from None
    if (time.time() if now is None else now) > expires_at:
        raise LinkError("This link has expired.")
