"""mediarithmics write side: activities, the email-open pixel, profile and choice updates.
Every write goes through the durable outbox and is answered 202 with an id; none is
cached. Each accepts an idempotency key (see `idempotency`). Consent links and pages are
in `consent`.

The pixel is recorded at most once per link within CCPROXY_PIXEL_DEDUP_WINDOW (per box in
SQLite, per deployment with Redis); without CCPROXY_LINK_SECRET unsigned pixels are only
recorded when CCPROXY_ALLOW_UNSIGNED_PIXEL=true (anyone could forge them).
"""

from __future__ import annotations

import base64
import logging
import sqlite3
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from . import auth, idempotency, links, params
from .clients.base import path_segment
from .errors import BadRequest, NotFound, OutboxUnavailable, PixelRefused, ProxyError
from .idempotency import IdemKey
from .outbox import Added, is_busy
from .responses import json_response

bp = Blueprint("writes", __name__)
log = logging.getLogger("ccproxy.writes")

# A 1x1 transparent GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PIXEL_PATH = "/v1/mediarithmics/pixel.gif"
LEGACY_IDS = ("$user_agent_id", "$email_hash")
SELECTOR_PARAMS = ("user_point_id", "user_agent_id", "email_hash", "compartment_id", "user_account_id")


def _services():
    return current_app.extensions["ccproxy"]


def _outbox():
    services = _services()
    services.mediarithmics.require()
    return services.outbox


def _accepted(added: Added, kind: str) -> Response:
    return json_response({"ok": True, "id": added.id, "kind": kind, "state": "queued",
                          "duplicate": added.duplicate,
                          "status_url": f"/v1/mediarithmics/writes/{added.id}"}, 202,
                         {"Cache-Control": "no-store"})


def _json_object_body() -> dict[str, Any]:
    body = params.json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)",
                         code="invalid_body")
    return body


def _request_key(body: Any) -> IdemKey | None:
    """The caller's idempotency key, scoped to its credential and this endpoint."""
    headers: Any = request.headers  # werkzeug's Headers: a mapping in all but name
    return idempotency.from_request(
        headers, request.args, auth.presented_key(headers),
        f"{request.method} {request.path}", body, _services().settings.idempotency_ttl)


def store(kind: str, method: str, path: str, query: dict[str, str], body: Any, *,
          timeout: float | None = None, idem: IdemKey | None = None, sheddable: bool = False) -> Added:
    """Store a write in the outbox (once per live idempotency key). A write that cannot be
    stored is a 503 with Retry-After: nothing was recorded, the caller may retry."""
    outbox = _outbox()
    write_id = uuid.uuid4().hex
    redis = _services().redis
    shared = idempotency.RedisKeys(redis) if idem is not None and redis is not None else None
    if shared is not None and idem is not None:
        earlier = shared.claim(idem, write_id)
        if earlier:
            return Added(earlier, duplicate=True)
    try:
        added = outbox.add(kind, method, path, query, body, timeout, idem=idem, write_id=write_id,
                           sheddable=sheddable)
    except (sqlite3.Error, OSError) as exc:
        if shared is not None and idem is not None:
            shared.forget(idem, write_id)
        busy = isinstance(exc, sqlite3.Error) and is_busy(exc)
        if not busy:
            outbox.dropped["outbox_unwritable"] += 1
            log.error("outbox write failed: %s", exc)
        raise OutboxUnavailable("the write could not be stored; nothing was recorded",
                                retry_after=1 if busy else 5) from None
    except ProxyError:
        if shared is not None and idem is not None:
            shared.forget(idem, write_id)
        raise
    if shared is not None and idem is not None:
        shared.stored(idem, write_id, added.id)  # our pending claim now names the stored write
    return added


def activity_problem(activity: Any) -> str | None:
    """Why a user activity would be refused, or None (mediarithmics' documented rules)."""
    if not isinstance(activity, dict):
        return "the activity must be a JSON object"
    identifiers = activity.get("$user_identifiers")
    if identifiers is not None and (
        not isinstance(identifiers, list) or not identifiers
        or not all(isinstance(i, dict) for i in identifiers)
    ):
        return "$user_identifiers must be a non-empty list of identifier objects"
    legacy = any(activity.get(k) for k in LEGACY_IDS) or (
        activity.get("$user_account_id") and activity.get("$compartment_id"))
    if not identifiers and not legacy:
        return ("identify the user with $user_identifiers (or a legacy $user_agent_id, $email_hash, "
                "or $user_account_id with $compartment_id)")
    if not isinstance(activity.get("$type"), str) or not activity["$type"].strip():
        return "$type is required (a string such as TOUCH or SITE_VISIT)"
    ts = activity.get("$ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        return "$ts is required: the time in epoch milliseconds (an integer)"
    return None


def user_identifiers(selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """A user point selector as activity `$user_identifiers`."""
    if "user_agent_id" in selector:
        return [{"$type": "USER_AGENT", "$user_agent_id": selector["user_agent_id"]}]
    if "email_hash" in selector:
        return [{"$type": "USER_EMAIL", "$hash": selector["email_hash"]}]
    if "user_point_id" in selector:
        return [{"$type": "USER_POINT", "$user_point_id": selector["user_point_id"]}]
    return [{"$type": "USER_ACCOUNT", "$compartment_id": selector["compartment_id"],
             "$user_account_id": selector["user_account_id"]}]


def _activities_path() -> str:
    return f"/v1/datamarts/{path_segment(_services().mediarithmics.datamart_id)}/user_activities"


@bp.post("/v1/mediarithmics/activities")
def post_activity():
    activity = params.json_body(request)
    problem = activity_problem(activity)
    if problem:
        raise BadRequest(problem, code="invalid_activity")
    added = store("activity", "POST", _activities_path(), {}, activity, idem=_request_key(activity),
                  sheddable=True)
    return _accepted(added, "activity")


def email_open_activity(args: Mapping[str, str]) -> dict[str, Any]:
    """The activity a pixel load records: one event, its extra parameters as properties."""
    selector = params.user_point_selector(args)
    event = params.identifier(args, "event", required=True)
    props = {k: v for k, v in args.items()
             if k not in (*SELECTOR_PARAMS, "event", links.EXPIRES, links.SIGNATURE)}
    if len(props) > 20 or any(len(k) > 64 or len(v) > 256 for k, v in props.items()):
        raise BadRequest("too many or too long event properties", code="invalid_parameter")
    now = int(time.time() * 1000)
    return {"$type": "TOUCH", "$ts": now, "$user_identifiers": user_identifiers(selector),
            "$origin": {"$channel": "email"},
            "$events": [{"$event_name": event, "$ts": now, "$properties": props}]}


def _record_open(args: Mapping[str, str]) -> None:
    services = _services()
    settings = services.settings
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
    added = store("activity", "POST", _activities_path(), {}, activity, timeout=0.05, idem=idem,
                  sheddable=True)
    if added.duplicate:
        raise PixelRefused("duplicate", "the same pixel link was recorded within the dedup window")


@bp.get(PIXEL_PATH)
def pixel():
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
        _outbox().dropped[f"pixel_{reason}"] += 1
    except ProxyError:
        pass


def _profile_selector(args: Mapping[str, str]) -> dict[str, str]:
    """The user point: one of user_point_id, user_agent_id, email_hash, else the profile's own
    compartment_id + user_account_id (mediarithmics' two uses of those names)."""
    point = {k: v for k in ("user_point_id", "user_agent_id", "email_hash") if (v := params.identifier(args, k))}
    if len(point) > 1:
        raise BadRequest("give at most one of user_point_id, user_agent_id, email_hash",
                         code="invalid_selector")
    if point:
        return point
    return {"compartment_id": args["compartment_id"], "user_account_id": args["user_account_id"]}


@bp.put("/v1/mediarithmics/profile")
def put_profile():
    profile = _json_object_body()
    args = request.args
    compartment = params.identifier(args, "compartment_id", required=True)
    account = params.identifier(args, "user_account_id", required=True)
    force_replace = params.boolean(args, "force_replace", False)
    query = {"force_replace": "true" if force_replace else "false"}
    if not force_replace and args.get("merge_objects"):
        # Only considered when not replacing (mediarithmics docs).
        query["merge_objects"] = "true" if params.boolean(args, "merge_objects", False) else "false"
    client = _services().mediarithmics
    path = (client.user_point_path(_profile_selector(args))
            + f"/user_profiles/compartment_id={path_segment(compartment or '')}"
            + f"/user_account_id={path_segment(account or '')}")
    return _accepted(store("profile", "PUT", path, query, profile, idem=_request_key(profile)), "profile")


def processing_id_of(args: Mapping[str, str]) -> str:
    from .endpoints.mediarithmics import processing_id

    value = processing_id(args, required=True)
    assert value is not None
    return value


def choice_path(selector: Mapping[str, str], processing: str) -> str:
    client = _services().mediarithmics
    return client.user_point_path(dict(selector)) + f"/user_choices/processing_id={path_segment(processing)}"


@bp.put("/v1/mediarithmics/choices")
def put_choice():
    choice = _json_object_body()
    if not isinstance(choice.get("$choice_acceptance_value"), bool):
        raise BadRequest("$choice_acceptance_value is required (true or false)", code="invalid_body")
    selector = params.user_point_selector(request.args)
    processing = processing_id_of(request.args)
    added = store("choice", "PUT", choice_path(selector, processing), {}, choice, idem=_request_key(choice))
    return _accepted(added, "choice")


@bp.get("/v1/mediarithmics/writes/<write_id>")
def write_status(write_id: str):
    write = _outbox().get(write_id) if len(write_id) <= 64 else None
    if write is None:
        raise NotFound(f"no write with id {write_id!r}", code="unknown_write")
    return json_response(write.status(), headers={"Cache-Control": "no-store"})


def base_url() -> str:
    return (_services().settings.public_url or request.host_url).rstrip("/")


def expiry(args: Mapping[str, str]) -> int:
    raw = args.get("expires")
    days = _services().settings.link_ttl_days
    if not raw:
        return int(time.time() + days * 86400)
    if not (raw.isascii() and raw.isdigit()) or int(raw) <= time.time():
        raise BadRequest("expires must be a future time in Unix seconds", code="invalid_parameter")
    return int(raw)


@bp.get("/v1/mediarithmics/pixel-link")
def pixel_link():
    args = request.args
    email_open_activity(args)  # validates the selector, event and properties
    settings = _services().settings
    link_params = {k: v for k, v in args.items() if k != "expires"}
    if not settings.link_secret:
        url = f"{base_url()}{PIXEL_PATH}?{urlencode(link_params)}"
    else:
        url = f"{base_url()}{PIXEL_PATH}?" + links.signed_query(
            settings.link_secret, PIXEL_PATH, link_params, expiry(args))
    return json_response({"ok": True, "url": url}, headers={"Cache-Control": "no-store"})
