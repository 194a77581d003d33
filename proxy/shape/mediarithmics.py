"""mediarithmics user point answers -> flat profiles and user choices (pure).

Field names carry a `$` prefix (`$choice_ts`); it is dropped and nested objects are
flattened with `_`. Epoch-millisecond timestamps (`*_ts`) also get an ISO 8601 twin.
"""

from __future__ import annotations

from typing import Any, TypedDict

from .common import flatten, iso_from_epoch_millis, numbers, to_identifier


class MediarithmicsProfileAnswer(TypedDict):
    ok: bool
    found: bool
    profile: dict[str, Any]
    profiles: list[dict[str, Any]]
    profile_count: int
    numbers: dict[str, float]  # every field of `profile` that is a number or canonical decimal


class _ChoicesFields(TypedDict):
    ok: bool
    found: bool
    choices: dict[str, bool]
    choices_list: list[dict[str, Any]]
    choice_count: int
    unrecorded: list[str]  # requested processing ids with no record (their choice reads false)


class ChoicesAnswer(_ChoicesFields, total=False):
    # With processing_id: that processing's choice (false when never chosen), so a template
    # reads `consent.accepted` whichever processing the call asked for.
    accepted: bool


class HistoryAnswer(TypedDict):
    ok: bool
    found: bool
    processing_id: str
    history: list[dict[str, Any]]
    history_count: int


def flat_record(record: dict[str, Any]) -> dict[str, Any]:
    """One mediarithmics object flattened; `x_ts` epoch millis also as `x_ts_iso`."""
    flat = flatten(record, drop_prefix="$")
    for key, value in list(flat.items()):
        if key.endswith("_ts") and f"{key}_iso" not in flat:
            flat[f"{key}_iso"] = iso_from_epoch_millis(value)
    return flat


def profile(data: list[dict[str, Any]] | None) -> MediarithmicsProfileAnswer:
    """The first profile at `profile`, every one under `profiles`."""
    profiles = [flat_record(p) for p in data or [] if isinstance(p, dict)]
    return {
        "ok": True,
        "found": bool(profiles),
        "profile": profiles[0] if profiles else {},
        "profiles": profiles,
        "profile_count": len(profiles),
        "numbers": numbers(profiles[0]) if profiles else {},
    }


def _accepted(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


def choices(data: list[dict[str, Any]] | None, processing_id: str | None = None) -> ChoicesAnswer:
    """`choices.processing_<id>` = the acceptance value, plus each choice flattened."""
    records = [c for c in data or [] if isinstance(c, dict)]
    if processing_id is not None:
        records = [c for c in records if str(c.get("$processing_id")) == processing_id]
    flags = {
        to_identifier(f"processing_{c.get('$processing_id', '')}"): _accepted(
            c.get("$choice_acceptance_value")
        )
        for c in records
    }
    # A requested processing the user never chose reads false ("not subscribed") and is
    # listed in `unrecorded`, so a template can tell "never chose" from "refused".
    unrecorded = []
    if processing_id is not None and not records:
        flags[to_identifier(f"processing_{processing_id}")] = False
        unrecorded.append(processing_id)
    answer: ChoicesAnswer = {
        "ok": True,
        "found": bool(records),
        "choices": flags,
        "choices_list": [flat_record(c) for c in records],
        "choice_count": len(records),
        "unrecorded": unrecorded,
    }
    if processing_id is not None:
        answer["accepted"] = flags[to_identifier(f"processing_{processing_id}")]
    return answer


def _stamp(entry: dict[str, Any]) -> float:
    stamp = entry.get("choice_ts")
    return float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else 0.0


def history(data: list[dict[str, Any]] | None, processing_id: str) -> HistoryAnswer:
    """A choice's change log, newest first."""
    entries = [flat_record(e) for e in data or [] if isinstance(e, dict)]
    entries.sort(key=_stamp, reverse=True)
    return {
        "ok": True,
        "found": bool(entries),
        "processing_id": processing_id,
        "history": entries,
        "history_count": len(entries),
    }
