"""The JSON form of a cached answer entry, for stores that processes share (Redis, the box
cache). JSON, never pickle: whoever can write the shared store must not be able to run code
in the proxy."""

from __future__ import annotations

import json

from .cache import Entry
from .clients.base import Answer


def encode_entry(entry: Entry) -> str:
    answer: Answer = entry.value
    return json.dumps({"d": answer.data, "m": answer.missing, "s": entry.stored_at,
                       "t": entry.ttl, "k": entry.keep}, separators=(",", ":"))


def decode_entry(raw: bytes | str) -> Entry | None:
    """The entry, or None when the text is not one (a corrupt or foreign value is a miss)."""
    try:
        data = json.loads(raw)
        return Entry(Answer(data["d"], bool(data["m"])), float(data["s"]), float(data["t"]), float(data["k"]))
    except (ValueError, KeyError, TypeError):
        return None
