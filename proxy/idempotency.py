"""Idempotency keys for writes: Braze renders one message several times (HTML, text, AMP,
retries), and each render may call a write endpoint; a key makes them one write.

A key comes as the `Idempotency-Key` header or the `idempotency_key` query parameter (so a
Connected Content URL can carry `{{campaign.${dispatch_id}}}-{{${user_id}}}`). It is scoped
to the caller's credential and the endpoint, stored only as a SHA-256 digest, and remembered
with a digest of the request it first named:

- per box, in the outbox's unique index, written in the write's own SQLite transaction;
- per deployment, in Redis when `CCPROXY_REDIS_URL` is set (`SET NX` of a short pending
  claim, made the first write's id once it is committed: see `RedisKeys`), since the
  renders of one message can land on different machines. If Redis is down the box's index
  still holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import credential_id
from .errors import BadRequest, IdempotencyKeyInProgress, IdempotencyKeyReused

log = logging.getLogger("ccproxy.idempotency")
HEADER = "Idempotency-Key"
PARAM = "idempotency_key"
REDIS_PREFIX = "ccproxy:idem:"
MAX_LENGTH = 255
PENDING = "pending:"
PENDING_TTL = 10.0  # seconds a claim lives before its write is committed (commits take ms; a
#                     request's outbox wait is bounded by a few seconds)
DUPLICATE_WAIT = 1.0  # seconds a duplicate waits for the first write's commit (Braze: 2 s)
POLL = 0.05
# Replace (or delete, for an empty value) the key only while it still holds our pending claim.
SWAP_IF_MINE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3])) end
return 1
"""


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
    """The deployment-wide half. A key goes through two values: `pending:<id>:<digest>` for
    PENDING_TTL while its first write is being stored, then `<id>:<digest>` for the key's TTL
    once the write is committed to the outbox. So a duplicate is never told "duplicate" of a
    write that was not stored, and a first write that failed (even when Redis could not be
    told) leaves at most a short-lived pending claim, never a key naming a write that does
    not exist. A duplicate that finds the key pending waits up to DUPLICATE_WAIT for the
    commit, then answers 409 `idempotency_key_in_progress` with Retry-After: 1."""

    def __init__(self, health: Any, duplicate_wait: float = DUPLICATE_WAIT):
        self.health = health  # redis_backend.RedisHealth
        self.duplicate_wait = duplicate_wait

    def claim(self, idem: IdemKey, write_id: str) -> str | None:
        """None when this write is the first with the key (now pending under its id) or Redis
        cannot say; else the committed first write's id. Raises IdempotencyKeyReused when the
        key named another request, IdempotencyKeyInProgress when its first write is still
        being stored after the wait."""
        name = REDIS_PREFIX + idem.key
        mine = f"{PENDING}{write_id}:{idem.body_hash}"
        pending_ms = max(1, int(min(PENDING_TTL, idem.ttl) * 1000))

        def first_or_existing() -> Any:
            client = self.health.client
            if client.set(name, mine, nx=True, px=pending_ms):
                return None
            return client.get(name) or b""  # b"": gone meanwhile, try again

        deadline = time.monotonic() + self.duplicate_wait
        while True:
            existing = self.health.run(first_or_existing)
            if existing is None:
                return None
            text = existing.decode() if isinstance(existing, bytes) else str(existing)
            if text:
                pending = text.startswith(PENDING)
                earlier_id, _, earlier_hash = text.removeprefix(PENDING).partition(":")
                if earlier_hash != idem.body_hash:
                    raise IdempotencyKeyReused("this idempotency key was first used with a different "
                                               "request; use a new key for a new write")
                if not pending:
                    return earlier_id
                if time.monotonic() >= deadline:
                    raise IdempotencyKeyInProgress("a request with this idempotency key is still being "
                                                   "stored; retry shortly for its answer")
            time.sleep(POLL)

    def stored(self, idem: IdemKey, write_id: str, stored_id: str) -> None:
        """The write is committed (`stored_id`: ours, or the box's earlier one under this key):
        the pending claim becomes the key's answer for its TTL."""
        ok = self.health.run(lambda: self._swap(idem, write_id, f"{stored_id}:{idem.body_hash}",
                                                max(1, int(idem.ttl * 1000))))
        if ok == 0:  # our claim lapsed before the commit (a very slow disk): another may hold it
            log.warning("idempotency claim lapsed before its write was stored; the key is not "
                        "shared deployment-wide for this write")

    def forget(self, idem: IdemKey, write_id: str) -> None:
        """The write was not stored: drop our pending claim (only ours), so a retry can store it.
        If Redis cannot be told, the claim lapses within PENDING_TTL."""
        self.health.run(lambda: self._swap(idem, write_id, "", 0))

    def _swap(self, idem: IdemKey, write_id: str, value: str, ttl_ms: int) -> Any:
        mine = f"{PENDING}{write_id}:{idem.body_hash}"
        return self.health.client.eval(SWAP_IF_MINE, 1, REDIS_PREFIX + idem.key, mine, value, ttl_ms)
