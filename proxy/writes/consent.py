"""One-click consent links and the pages a recipient sees: links that always work.

- Unsubscribe links (`accept=false`) bind no choice version: withdrawing consent must work
  for as long as the link lives, whatever changed since (CAN-SPAM, GDPR, RFC 8058). Older
  unsubscribe links that carry a `v` are honoured the same way.
- Subscribe links (`accept=true`) bind the choice's version (`$choice_ts`), so a link from
  an old email cannot undo a later unsubscribe. When that version cannot be read, no link
  is signed: `consent-link` answers 503 + Retry-After rather than a guess.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, request

from .. import idempotency, links, params
from ..auth import open_to_all
from ..errors import ConsentStateUnknown, NotConfigured, ProxyError
from ..responses import json_response
from ..shape import mediarithmics as shape
from .choices import choice_path, processing_id_of
from .link_urls import base_url, expiry
from .submit import services as _services
from .submit import store

bp = Blueprint("consent", __name__)
CONSENT_PATH = "/v1/mediarithmics/consent"
# Replays of one link (a recipient's double click, a mail client's one-click POST, a script)
# are one write within this window; after it the same link records again, so an old
# unsubscribe link still works after a later resubscribe.
CONSENT_REPLAY_WINDOW = 600.0
LINK_PARAMS = (*params.USER_POINT_PARAMS, "processing_id", "accept", "v", links.EXPIRES, links.SIGNATURE)


def current_choice_version(selector: Mapping[str, str], processing: str) -> str:
    """The choice's last change (`$choice_ts`), read fresh: confirming a link checks it."""
    answer = _services().mediarithmics.choices(selector, processing).send()
    return _version(shape.choices(answer.data, processing)["choices_list"])


def issued_choice_version(selector: Mapping[str, str], processing: str) -> str:
    """The same, through the cache: links are made at send time, once per recipient, and a
    read per link must not cost an upstream call each (a change within the cache TTL only
    makes the link ask the recipient to use a newer email). An answer that is not the
    upstream's (an error, an operator fallback) raises ConsentStateUnknown."""
    from ..endpoints import call

    done = call(_services(), "/v1/mediarithmics/choices", {**selector, "processing_id": processing})
    if done.status != 200 or done.body.get("fallback"):
        raise ConsentStateUnknown("the current choice could not be read, so no subscribe link "
                                  "was signed; retry shortly")
    return _version(done.body.get("choices_list", []))


def _version(choices_list: Iterable[Any]) -> str:
    """A choice's version: its latest `choice_ts` in the shaped answer (0: never chosen)."""
    stamps = [c.get("choice_ts") or 0 for c in choices_list if isinstance(c, dict)]
    return str(max(stamps) if stamps else 0)


def consent_url(selector: Mapping[str, str], processing: str, accept: bool,
                expires_at: int, base: str) -> str:
    """A signed link; a subscribe link binds the choice's version (read through the cache)."""
    settings = _services().settings
    if not settings.link_secret:
        raise NotConfigured("links", "signed links are not configured: set CCPROXY_LINK_SECRET")
    link_params = {**selector, "processing_id": processing, "accept": "true" if accept else "false"}
    if accept:
        link_params["v"] = issued_choice_version(selector, processing)
    return f"{base}{CONSENT_PATH}?{links.signed_query(settings.link_secret, CONSENT_PATH, link_params, expires_at)}"


@bp.get("/v1/mediarithmics/consent-link")
def consent_link() -> Response:
    args = request.args
    selector = params.user_point_selector(args)
    processing = processing_id_of(args)
    accept = params.boolean(args, "accept", False)
    url = consent_url(selector, processing, accept, expiry(args), base_url())
    return json_response({"ok": True, "url": url}, headers={"Cache-Control": "no-store"})


def _page(title: str, body: str, status: int = 200, retry_after: int | None = None) -> Response:
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#1f2328}}
button{{font:inherit;padding:.6rem 1.2rem;border:0;border-radius:6px;background:#0969da;color:#fff;cursor:pointer}}</style>
</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"""
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(page, status=status, mimetype="text/html", headers=headers)


def _verified_link(args: Mapping[str, str]) -> tuple[dict[str, str], str, bool, str | None]:
    links.verify(_services().settings.link_secret, CONSENT_PATH, args)
    unknown = set(args) - set(LINK_PARAMS)
    if unknown:
        raise links.LinkError("This link is not valid.")
    selector = {k: args[k] for k in params.USER_POINT_PARAMS if k in args}
    return selector, args.get("processing_id", ""), args.get("accept") == "true", args.get("v")


@bp.get(CONSENT_PATH)
@open_to_all
def consent_page() -> Response:
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
@open_to_all
def consent_confirm() -> Response:
    """Confirmation, and RFC 8058 one-click (`List-Unsubscribe=One-Click` POSTed by the mail client)."""
    try:
        selector, processing, accept, version = _verified_link(request.args)
        idem = idempotency.link_key(CONSENT_PATH, urlencode(sorted(request.args.items())),
                                    CONSENT_REPLAY_WINDOW)
        # Only a subscribe is checked against the version it was made for; an unsubscribe
        # within its expiry is always honoured, and needs no upstream read.
        # A choice still queued (say, an unsubscribe waiting out an upstream failure) is a
        # change mediarithmics does not show yet: an older subscribe link must not undo it.
        # Unless that choice is this link's own and nothing came after it (a double click, a
        # mail client's retry): the same answer again, not "changed since" because of it.
        if accept and not _services().outbox.holds_latest(idem) and (
                _services().outbox.has_pending("choice", choice_path(selector, processing))
                or current_choice_version(selector, processing) != (version or "0")):
            raise links.LinkError("Your preferences changed since this email was sent, so this "
                                  "link no longer applies.")
    except links.LinkError as refused:
        return _page("Link not valid", f"<p>{html.escape(refused.reason)} Nothing was changed.</p>", 403)
    except ProxyError:
        return _page("Please try again", "<p>We could not check your preferences just now. "
                     "Nothing was changed; please try again in a minute.</p>", 503, 60)
    choice = {"$choice_acceptance_value": accept, "$choice_ts": int(time.time() * 1000),
              "$origin": "email-link"}
    try:
        store("choice", _services().mediarithmics.put_choice(selector, processing, choice), idem=idem)
    except ProxyError:
        return _page("Please try again", "<p>Nothing was changed; please try again in a minute.</p>", 503, 60)
    done = "You are subscribed." if accept else "You are unsubscribed. You will not receive these emails any more."
    return _page("Done", f"<p>{done}</p>")
