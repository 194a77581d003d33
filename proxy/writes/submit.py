"""A write into the durable outbox and its answer: 202 with an id, whose status
`/v1/mediarithmics/writes/<id>` reports. Each write accepts an idempotency key (see
`idempotency`): claimed across the deployment with Redis, else per outbox (SQLite, per box).
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, request

from .. import auth, idempotency, params
from ..clients.mediarithmics import Write
from ..errors import BadRequest, NotFound, OutboxUnavailable, ProxyError
from ..idempotency import IdemKey
from ..outbox import Added, Outbox, is_busy
from ..responses import json_response
from ..services import Services, of_app

bp = Blueprint("writes", __name__)
log = logging.getLogger("ccproxy.writes")


def services() -> Services:
    return of_app(current_app)


def outbox() -> Outbox:
    """The outbox, once mediarithmics is configured (else NotConfigured)."""
    current = services()
    current.mediarithmics.require()
    return current.outbox


def accepted(added: Added, kind: str) -> Response:
    return json_response({"ok": True, "id": added.id, "kind": kind, "state": added.state,
                          "duplicate": added.duplicate,
                          "status_url": f"/v1/mediarithmics/writes/{added.id}"}, 202,
                         {"Cache-Control": "no-store"})


def json_object_body() -> dict[str, Any]:
    body = params.json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)",
                         code="invalid_body")
    return body


def request_key(body: Any) -> IdemKey | None:
    """The caller's idempotency key, scoped to its credential and this endpoint."""
    headers: Any = request.headers  # werkzeug's Headers: a mapping in all but name
    return idempotency.from_request(
        headers, request.args, auth.presented_key(headers),
        f"{request.method} {request.path}", body, services().settings.idempotency_ttl)


def _state_here(box: Outbox, write_id: str) -> str:
    """An earlier write's state when this box's outbox holds it; "queued" (accepted) when
    another instance stored it or the file cannot say."""
    try:
        earlier = box.get(write_id)
    except sqlite3.Error:
        return "queued"
    return earlier.state if earlier is not None else "queued"


def store(kind: str, write: Write, *, timeout: float | None = None, idem: IdemKey | None = None,
          sheddable: bool = False) -> Added:
    """Store a write in the outbox (once per live idempotency key). A write that cannot be
    stored is a 503 with Retry-After: nothing was recorded, the caller may retry."""
    box = outbox()
    write_id = uuid.uuid4().hex
    redis = services().redis
    shared = idempotency.RedisKeys(redis) if idem is not None and redis is not None else None
    if shared is not None and idem is not None:
        earlier = shared.claim(idem, write_id)
        if earlier:
            return Added(earlier, duplicate=True, state=_state_here(box, earlier))
    try:
        added = box.add(kind, write.method, write.path, write.query, write.body, timeout, idem=idem,
                        write_id=write_id, sheddable=sheddable)
    except (sqlite3.Error, OSError) as exc:
        if shared is not None and idem is not None:
            shared.forget(idem, write_id)
        busy = isinstance(exc, sqlite3.Error) and is_busy(exc)
        if not busy:
            box.dropped["outbox_unwritable"] += 1
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


@bp.get("/v1/mediarithmics/writes/<write_id>")
def write_status(write_id: str) -> Response:
    write = outbox().get(write_id) if len(write_id) <= 64 else None
    if write is None:
        raise NotFound(f"no write with id {write_id!r}", code="unknown_write")
    return json_response(write.status(), headers={"Cache-Control": "no-store"})
