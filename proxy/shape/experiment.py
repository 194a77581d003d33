"""Amplitude Experiment `vardata` answers -> `variants.<flag>` and `payloads.<flag>` (pure)."""

from __future__ import annotations

from typing import Any, TypedDict

from .common import deep_identifier_keys, identifier_keys

OFF = "off"  # what a requested flag reads as when the user is not assigned a variant


class VariantsAnswer(TypedDict):
    ok: bool
    found: bool
    user_id: str
    device_id: str
    variants: dict[str, str]
    payloads: dict[str, Any]
    flag_count: int
    tracked: bool


def variants(
    vardata: dict[str, Any],
    requested: list[str],
    user_id: str = "",
    device_id: str = "",
    tracked: bool = True,
) -> VariantsAnswer:
    """Every assigned flag, plus `off` for each requested flag without an assignment
    (a user outside every audience may get `{}`)."""
    assigned: dict[str, str] = {}
    payloads: dict[str, Any] = {}
    for flag, variant in vardata.items():
        if not isinstance(variant, dict) or variant.get("key") in (None, ""):
            continue
        assigned[flag] = str(variant["key"])
        if variant.get("payload") is not None:
            payloads[flag] = deep_identifier_keys(variant["payload"])
    all_flags = {flag: assigned.get(flag, OFF) for flag in requested}
    all_flags.update(assigned)
    # One naming for both maps: `checkout-button` and `checkout_button` become `checkout_button`
    # and `checkout_button_2` in `variants`, and a payload must sit under the same name.
    names = {flag: name for name, flag in identifier_keys({flag: flag for flag in all_flags}).items()}
    return {
        "ok": True,
        "found": bool(assigned),
        "user_id": user_id,
        "device_id": device_id,
        "variants": {names[flag]: variant for flag, variant in all_flags.items()},
        "payloads": {names[flag]: payload for flag, payload in payloads.items()},
        "flag_count": len(all_flags),
        "tracked": tracked,
    }
