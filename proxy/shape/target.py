"""Adobe Target profile answers -> `profile.<attribute>` (pure).

Attribute names often contain dots (`user.memberlevel`); values are strings.
"""

from __future__ import annotations

from typing import Any, TypedDict

from .common import as_dict, as_text, identifier_keys, iso_from_text, numbers


class TargetProfileAnswer(TypedDict):
    ok: bool
    found: bool
    tnt_id: str
    third_party_id: str
    modified_at: str  # YYYY-MM-DDTHH:MM:SSZ (Target sends milliseconds; dropped)
    profile: dict[str, Any]  # attribute values as Target sends them (strings)
    attribute_count: int
    numbers: dict[str, float]  # every profile attribute that is a canonical decimal, as a number


def profile(raw: dict[str, Any] | None, tntid: str = "", third_party_id: str = "") -> TargetProfileAnswer:
    """The visitor's attributes; a missing profile is `found: false` with the asked id echoed."""
    raw = raw or {}
    visitor = as_dict(raw.get("visitorId"))
    attributes = as_dict(raw.get("profileAttributes"))
    values = {
        name: (attr.get("value", "") if isinstance(attr, dict) else attr)
        for name, attr in attributes.items()
    }
    profile = identifier_keys({k: "" if v is None else v for k, v in values.items()})
    return {
        "ok": True,
        "found": bool(raw),
        "tnt_id": as_text(visitor.get("tntId")) or tntid or "",
        "third_party_id": as_text(visitor.get("thirdPartyId")) or third_party_id or "",
        "modified_at": iso_from_text(raw.get("modifiedAt")),
        "profile": profile,
        "attribute_count": len(values),
        "numbers": numbers(profile),
    }
