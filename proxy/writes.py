"""mediarithmics write side: activities, the email-open pixel, profile and choice updates,
signed one-click consent links. Every write goes through the durable outbox and is
answered 202 with an id; none is cached.
"""

from __future__ import annotations

import base64
import html
import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from . import links, params
from .clients.base import path_segment
from .errors import BadRequest, NotConfigured, NotFound, ProxyError
from .responses import json_response

bp = Blueprint("writes", __name__)
log = logging.getLogger("ccproxy.writes")

# A 1x1 transparent GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PIXEL_PATH = "/v1/mediarithmics/pixel.gif"
CONSENT_PATH = "/v1/mediarithmics/consent"
LEGACY_IDS = ("$user_agent_id", "$email_hash")
SELECTOR_PARAMS = ("user_point_id", "user_agent_id", "email_hash", "compartment_id", "user_account_id")
LINK_PARAMS = (*SELECTOR_PARAMS, "processing_id", "accept", "v", links.EXPIRES, links.SIGNATURE)


def _services():
    return current_app.extensions["ccproxy"]


def _outbox():
    services = _services()
    services.mediarithmics.require()
    return services.outbox


def _accepted(write_id: str, kind: str) -> Response:
    return json_response({"ok": True, "id": write_id, "kind": kind, "state": "queued",
                          "status_url": f"/v1/mediarithmics/writes/{write_id}"}, 202,
                         {"Cache-Control": "no-store"})


def _json_object_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)",
                         code="invalid_body")
    return body


def _store(kind: str, method: str, path: str, query: dict[str, str], body: Any,
           timeout: float | None = None) -> str:
    outbox = _outbox()
    try:
        return outbox.add(kind, method, path, query, body, timeout)
    except (sqlite3.Error, OSError):
        log.exception("outbox write failed")
        raise ProxyError("the write could not be stored; nothing was recorded",
                         code="outbox_unavailable", retry_after=5) from None


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
    activity = request.get_json(silent=True)
    problem = activity_problem(activity)
    if problem:
        raise BadRequest(problem, code="invalid_activity")
    return _accepted(_store("activity", "POST", _activities_path(), {}, activity), "activity")


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


@bp.get(PIXEL_PATH)
def pixel():
    """Always a 1x1 GIF, fast: a broken or busy outbox never breaks an email's rendering."""
    try:
        settings = _services().settings
        if settings.link_secret:
            links.verify(settings.link_secret, PIXEL_PATH, request.args)
        activity = email_open_activity(request.args)
        # A short wait at most: the open is worth less than the email client's patience.
        _store("activity", "POST", _activities_path(), {}, activity, timeout=0.05)
    except (ProxyError, links.LinkError) as why:
        log.info("pixel not recorded: %s", getattr(why, "message", None) or getattr(why, "reason", why))
    except Exception:
        log.exception("pixel not recorded")
    return Response(PIXEL, mimetype="image/gif",
                    headers={"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0"})


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
    return _accepted(_store("profile", "PUT", path, query, profile), "profile")


def _processing_id(args: Mapping[str, str]) -> str:
    from .endpoints.mediarithmics import processing_id

    value = processing_id(args, required=True)
    assert value is not None
    return value


def _choice_path(selector: Mapping[str, str], processing: str) -> str:
    client = _services().mediarithmics
    return client.user_point_path(dict(selector)) + f"/user_choices/processing_id={path_segment(processing)}"


@bp.put("/v1/mediarithmics/choices")
def put_choice():
    choice = _json_object_body()
    if not isinstance(choice.get("$choice_acceptance_value"), bool):
        raise BadRequest("$choice_acceptance_value is required (true or false)", code="invalid_body")
    selector = params.user_point_selector(request.args)
    processing = _processing_id(request.args)
    return _accepted(_store("choice", "PUT", _choice_path(selector, processing), {}, choice), "choice")


@bp.get("/v1/mediarithmics/writes/<write_id>")
def write_status(write_id: str):
    write = _outbox().get(write_id) if len(write_id) <= 64 else None
    if write is None:
        raise NotFound(f"no write with id {write_id!r}", code="unknown_write")
    return json_response(write.status(), headers={"Cache-Control": "no-store"})


def current_choice_version(selector: Mapping[str, str], processing: str) -> str:
    """The choice's last change (`$choice_ts`), read fresh: confirming a link checks it."""
    answer = _services().mediarithmics.choices(dict(selector), processing)
    stamps = [c.get("$choice_ts") or 0 for c in answer.data or [] if isinstance(c, dict)]
    return str(max(stamps) if stamps else 0)


def issued_choice_version(selector: Mapping[str, str], processing: str) -> str:
    """The same, through the cache: links are made at send time, once per recipient, and a
    read per link must not cost an upstream call each (a change within the cache TTL only
    makes the link ask the recipient to use a newer email)."""
    from .endpoints import call

    done = call(_services(), "/v1/mediarithmics/choices", {**selector, "processing_id": processing})
    stamps = [c.get("choice_ts") or 0 for c in done.body.get("choices_list", []) if isinstance(c, dict)]
    return str(max(stamps) if stamps else 0)


def consent_url(selector: Mapping[str, str], processing: str, accept: bool,
                version: str, expires_at: int, base: str) -> str:
    settings = _services().settings
    if not settings.link_secret:
        raise NotConfigured("links", "signed links are not configured: set CCPROXY_LINK_SECRET")
    link_params = {**selector, "processing_id": processing, "accept": "true" if accept else "false",
                   "v": version}
    return f"{base}{CONSENT_PATH}?{links.signed_query(settings.link_secret, CONSENT_PATH, link_params, expires_at)}"


def _base_url() -> str:
    return (_services().settings.public_url or request.host_url).rstrip("/")


def _expiry(args: Mapping[str, str]) -> int:
    raw = args.get("expires")
    days = _services().settings.link_ttl_days
    if not raw:
        return int(time.time() + days * 86400)
    if not raw.isdigit() or int(raw) <= time.time():
        raise BadRequest("expires must be a future time in Unix seconds", code="invalid_parameter")
    return int(raw)


@bp.get("/v1/mediarithmics/consent-link")
def consent_link():
    args = request.args
    selector = params.user_point_selector(args)
    processing = _processing_id(args)
    accept = params.boolean(args, "accept", False)
    version = issued_choice_version(selector, processing)
    url = consent_url(selector, processing, accept, version, _expiry(args), _base_url())
    return json_response({"ok": True, "url": url}, headers={"Cache-Control": "no-store"})


@bp.get("/v1/mediarithmics/pixel-link")
def pixel_link():
    args = request.args
    email_open_activity(args)  # validates the selector, event and properties
    settings = _services().settings
    link_params = {k: v for k, v in args.items() if k != "expires"}
    if not settings.link_secret:
        url = f"{_base_url()}{PIXEL_PATH}?{urlencode(link_params)}"
    else:
        url = f"{_base_url()}{PIXEL_PATH}?" + links.signed_query(
            settings.link_secret, PIXEL_PATH, link_params, _expiry(args))
    return json_response({"ok": True, "url": url}, headers={"Cache-Control": "no-store"})


def _page(title: str, body: str, status: int = 200) -> Response:
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#1f2328}}
button{{font:inherit;padding:.6rem 1.2rem;border:0;border-radius:6px;background:#0969da;color:#fff;cursor:pointer}}</style>
</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    return Response(page, status=status, mimetype="text/html",
                    headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _verified_link(args: Mapping[str, str]) -> tuple[dict[str, str], str, bool, str]:
    links.verify(_services().settings.link_secret, CONSENT_PATH, args)
    unknown = set(args) - set(LINK_PARAMS)
    if unknown:
        raise links.LinkError("This link is not valid.")
    selector = {k: args[k] for k in SELECTOR_PARAMS if k in args}
    return selector, args.get("processing_id", ""), args.get("accept") == "true", args.get("v", "0")


@bp.get(CONSENT_PATH)
def consent_page():
    """What a recipient sees on clicking: a confirmation, so link scanners change nothing."""
    try:
        _selector, _processing, accept, _version = _verified_link(request.args)
    except links.LinkError as refused:
        return _page("Link not valid", f"<p>{html.escape(refused.reason)} Nothing was changed.</p>", 403)
    action = "Subscribe" if accept else "Unsubscribe"
    form = (f'<p>{"Receive" if accept else "Stop receiving"} these emails?</p>'
            f'<form method="post"><button type="submit">{action}</button></form>')
    return _page(f"{action}?", form)


@bp.post(CONSENT_PATH)
def consent_confirm():
    """Confirmation, and RFC 8058 one-click (`List-Unsubscribe=One-Click` POSTed by the mail client)."""
    try:
        selector, processing, accept, version = _verified_link(request.args)
        if current_choice_version(selector, processing) != version:
            raise links.LinkError("Your preferences changed since this email was sent, so this "
                                  "link no longer applies.")
    except links.LinkError as refused:
        return _page("Link not valid", f"<p>{html.escape(refused.reason)} Nothing was changed.</p>", 403)
    except ProxyError:
        return _page("Please try again", "<p>We could not check your preferences just now. "
                     "Nothing was changed; please try again in a minute.</p>", 503)
    choice = {"$choice_acceptance_value": accept, "$choice_ts": int(time.time() * 1000),
              "$origin": "email-link"}
    try:
        _store("choice", "PUT", _choice_path(selector, processing), {}, choice)
    except ProxyError:
        return _page("Please try again", "<p>Nothing was changed; please try again in a minute.</p>", 503)
    done = "You are subscribed." if accept else "You are unsubscribed. You will not receive these emails any more."
    return _page("Done", f"<p>{done}</p>")
