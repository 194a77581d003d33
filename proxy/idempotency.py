"""Idempotency keys for writes: Braze renders one message several times (HTML, text, AMP,
retries), and each render may call a write endpoint; a key makes them one write.

A key comes as the `Idempotency-Key` header or the `idempotency_key` query parameter (so a
Connected Content URL can carry `{{campaign.${dispatch_id}}}-{{${user_id}}}`). It is scoped
to the caller's credential and the endpoint, stored only as a SHA-256 digest, and remembered
with a digest of the request it first named:

- per box, in the outbox's unique index, written in the write's own SQLite transaction;
- per deployment, in Redis when `CCPROXY_REDIS_URL` is set (`SET NX` of the first write's
  id), since the renders of one message can land on different machines. If Redis is down
  the box's index still holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import credential_id
from .errors import BadRequest, IdempotencyKeyReused

log = logging.getLogger("ccproxy.idempotency")
HEADER = "Idempotency-Key"
PARAM = "idempotency_key"
REDIS_PREFIX = "ccproxy:idem:"
MAX_LENGTH = 255


@dataclass(frozen=True)
class IdemKey:
    key: str  # digest of credential, endpoint and the caller's key
    body_hash: str  # digest of the request it names
    ttl: float  # seconds it is remembered


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def request_digest(query: Mapping[str, str], body: Any) -> str:
    """The request a key names: its query (the key itself left out) and its JSON body."""
    kept = {k: v for k, v in query.items() if k != PARAM}
    return _digest(json.dumps([kept, body], sort_keys=True, separators=(",", ":")))


def from_request(headers: Mapping[str, str], query: Mapping[str, str], credential: str | None,
                 endpoint: str, body: Any, ttl: float) -> IdemKey | None:
    """The request's scoped key, or None when it carries none. A malformed key is a 400."""
    raw = headers.get(HEADER) or query.get(PARAM)
    if not raw:
        return None
    if len(raw) > MAX_LENGTH or not raw.isprintable():
        raise BadRequest(f"{HEADER} must be 1 to {MAX_LENGTH} printable characters",
                         code="invalid_parameter")
    return IdemKey(_digest(credential_id(credential or ""), endpoint, raw),
                   request_digest(query, body), ttl)


def link_key(scope: str, link: str, ttl: float) -> IdemKey:
    """A key for a link a recipient loads (a pixel): the link names the event."""
    key = _digest(scope, link)
    return IdemKey(key, key, ttl)


class RedisKeys:
    """The deployment-wide half: the first write's id under each key, for its TTL."""

    def __init__(self, health: Any):
        self.health = health  # redis_backend.RedisHealth

    def claim(self, idem: IdemKey, write_id: str) -> str | None:
        """None when this write is the first with the key (or Redis cannot say); else the
        first write's id. Raises IdempotencyKeyReused when the key named another request."""
        value = f"{write_id}:{idem.body_hash}"
        name = REDIS_PREFIX + idem.key
        ttl_ms = max(1, int(idem.ttl * 1000))

        def first_or_existing() -> Any:
            client = self.health.client
            if client.set(name, value, nx=True, px=ttl_ms):
                return None
            return client.get(name)

        existing = self.health.run(first_or_existing)
        if existing is None:
            return None
        earlier_id, _, earlier_hash = (existing.decode() if isinstance(existing, bytes) else str(existing)).partition(":")
        if earlier_hash != idem.body_hash:
            raise IdempotencyKeyReused("this idempotency key was first used with a different request; "
                                       "use a new key for a new write")
        return earlier_id

    def remember(self, idem: IdemKey, write_id: str) -> None:
        """The box already held a write under this key: name that one deployment-wide."""
        value = f"{write_id}:{idem.body_hash}"
        self.health.run(lambda: self.health.client.set(REDIS_PREFIX + idem.key, value,
                                                       px=max(1, int(idem.ttl * 1000))))

    def forget(self, idem: IdemKey) -> None:
        """The write was not stored after all: let a retry with the key store it."""
        self.health.run(lambda: self.health.client.delete(REDIS_PREFIX + idem.key))
