"""The email-open pixel and the links to it. A pixel load records one TOUCH activity.

The pixel is recorded at most once per link within CCPROXY_PIXEL_DEDUP_WINDOW (per box in
SQLite, per deployment with Redis); without CCPROXY_LINK_SECRET unsigned pixels are only
recorded when CCPROXY_ALLOW_UNSIGNED_PIXEL=true (anyone could forge them).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, request

from .. import idempotency, links, params
from ..auth import open_to_all
from ..errors import BadRequest, PixelRefused, ProxyError
from ..responses import json_response
from .activities import user_identifiers
from .link_urls import base_url, expiry
from .submit import outbox, services, store

bp = Blueprint("pixel", __name__)
log = logging.getLogger("ccproxy.writes")

# A 1x1 transparent GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PIXEL_PATH = "/v1/mediarithmics/pixel.gif"


def email_open_activity(args: Mapping[str, str]) -> dict[str, Any]:
    """The activity a pixel load records: one event, its extra parameters as properties."""
    selector = params.user_point_selector(args)
    event = params.identifier(args, "event", required=True)
    props = {k: v for k, v in args.items()
             if k not in (*params.USER_POINT_PARAMS, "event", links.EXPIRES, links.SIGNATURE)}
    if len(props) > 20 or any(len(k) > 64 or len(v) > 256 for k, v in props.items()):
        raise BadRequest("too many or too long event properties", code="invalid_parameter")
    now = int(time.time() * 1000)
    return {"$type": "TOUCH", "$ts": now, "$user_identifiers": user_identifiers(selector),
            "$origin": {"$channel": "email"},
            "$events": [{"$event_name": event, "$ts": now, "$properties": props}]}


def _record_open(args: Mapping[str, str]) -> None:
    settings = services().settings
    if settings.link_secret:
        links.verify(settings.link_secret, PIXEL_PATH, args)
    elif not settings.allow_unsigned_pixel:
        raise PixelRefused("unsigned", "unsigned pixel: set CCPROXY_LINK_SECRET "
                           "(or CCPROXY_ALLOW_UNSIGNED_PIXEL=true)")
    activity = email_open_activity(args)
    # The link itself names the open: its replays within the window are one open.
    idem = idempotency.link_key(PIXEL_PATH, urlencode(sorted(args.items())), settings.pixel_dedup_window) \
        if settings.pixel_dedup_window else None
    # A short wait at most: the open is worth less than the email client's patience.
    added = store("activity", services().mediarithmics.post_activity(activity), timeout=0.05,
                  idem=idem, sheddable=True)
    if added.duplicate:
        raise PixelRefused("duplicate", "the same pixel link was recorded within the dedup window")


@bp.get(PIXEL_PATH)
@open_to_all
def pixel() -> Response:
    """Always a 1x1 GIF, fast: a broken or busy outbox never breaks an email's rendering."""
    try:
        _record_open(request.args)
    except PixelRefused as why:
        _count_refused(why.reason)
        log.info("pixel not recorded: %s", why)
    except (ProxyError, links.LinkError) as why:
        log.info("pixel not recorded: %s", getattr(why, "message", None) or getattr(why, "reason", why))
    except Exception:
        log.exception("pixel not recorded")
    return Response(PIXEL, mimetype="image/gif",
                    headers={"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0"})


def _count_refused(reason: str) -> None:
    """Counted here: store() counts the outbox's own refusals (full, unwritable)."""
    try:
        outbox().dropped[f"pixel_{reason}"] += 1
    except ProxyError:
        pass


@bp.get("/v1/mediarithmics/pixel-link")
def pixel_link() -> Response:
    args = request.args
    email_open_activity(args)  # validates the selector, event and properties
    settings = services().settings
    link_params = {k: v for k, v in args.items() if k != "expires"}
    if not settings.link_secret:
        url = f"{base_url()}{PIXEL_PATH}?{urlencode(link_params)}"
    else:
        url = f"{base_url()}{PIXEL_PATH}?" + links.signed_query(
            settings.link_secret, PIXEL_PATH, link_params, expiry(args))
    return json_response({"ok": True, "url": url}, headers={"Cache-Control": "no-store"})
