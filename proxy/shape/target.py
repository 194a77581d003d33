"""Adobe Target profile answers -> `profile.<attribute>` (pure).

Attribute names often contain dots (`user.memberlevel`); values are strings.
"""

from __future__ import annotations

from typing import Any, TypedDict

from .common import identifier_keys


class TargetProfileAnswer(TypedDict):
    ok: bool
    found: bool
    tnt_id: str
    third_party_id: str
    modified_at: str
    profile: dict[str, Any]
    attribute_count: int


def profile(raw: dict[str, Any] | None, tntid: str = "", third_party_id: str = "") -> TargetProfileAnswer:
    """The visitor's attributes; a missing profile is `found: false` with the asked id echoed."""
    raw = raw or {}
    visitor = raw.get("visitorId") or {}
    attributes = raw.get("profileAttributes") or {}
    values = {
        name: (attr.get("value", "") if isinstance(attr, dict) else attr)
        for name, attr in attributes.items()
    }
    return {
        "ok": True,
        "found": bool(raw),
        "tnt_id": str(visitor.get("tntId") or tntid or ""),
        "third_party_id": str(visitor.get("thirdPartyId") or third_party_id or ""),
        "modified_at": str(raw.get("modifiedAt") or ""),
        "profile": identifier_keys({k: "" if v is None else v for k, v in values.items()}),
        "attribute_count": len(values),
    }
