"""Where a link sent in an email points (the public base URL) and until when it works."""

from __future__ import annotations

import time
from collections.abc import Mapping

from flask import request

from ..errors import BadRequest
from .submit import services


def base_url() -> str:
    """CCPROXY_PUBLIC_URL, else the host the request came to."""
    return (services().settings.public_url or request.host_url).rstrip("/")


def expiry(args: Mapping[str, str]) -> int:
    """The `expires` parameter (Unix seconds, in the future), else CCPROXY_LINK_TTL_DAYS from now."""
    raw = args.get("expires")
    days = services().settings.link_ttl_days
    if not raw:
        return int(time.time() + days * 86400)
    if not (raw.isascii() and raw.isdigit()) or int(raw) <= time.time():
        raise BadRequest("expires must be a future time in Unix seconds", code="invalid_parameter")
    return int(raw)
