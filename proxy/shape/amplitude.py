"""Amplitude User Profile API answers -> flat template dicts (pure functions).

Input is the upstream's `userData` object, or None when Amplitude answered
`{"error": "User id and device id not seen before"}`. Output keeps every key a
Liquid identifier and never puts null where a template expects a value.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

from .common import (
    as_dict,
    as_list,
    as_text,
    deep_identifier_keys,
    identifier_keys,
    iso_from_epoch_seconds,
    list_fields,
    number_or_text,
    to_identifier,
)

UserData = dict[str, Any]
COMPUTED_PREFIX = "computed-prop-"


class RecommendationFields(TypedDict, total=False):
    rec_id: str
    child_rec_id: str
    items: list[Any]
    item_count: int
    items_joined: str
    is_control: bool
    source: str
    last_updated: str
    # plus item_1 .. item_N


class Recommendation(RecommendationFields, total=False):
    found: bool


class Identity(TypedDict):
    ok: bool
    found: bool
    user_id: str
    device_id: str


class RecommendationsAnswer(Identity, RecommendationFields, total=False):
    recommendations: dict[str, Recommendation]


class PropertiesAnswer(Identity):
    properties: dict[str, Any]


class ComputationsAnswer(Identity, total=False):
    computations: dict[str, Any]  # numbers where the computation is numeric
    value: Any  # with comp_id: the computation, 0 when comp_found is false
    comp_found: bool  # with comp_id: whether Amplitude had that computation


class CohortFields(TypedDict, total=False):
    cohort_ids: list[str]
    cohort_count: int
    cohort_ids_joined: str
    cohorts: dict[str, bool]


class CohortsAnswer(Identity, total=False):
    cohort_ids: list[str]
    cohort_count: int
    cohort_ids_joined: str
    cohorts: dict[str, bool]
    member: bool


class ProfileAnswer(RecommendationsAnswer, total=False):
    properties: dict[str, Any]  # amp_props; computed_prop_* as numbers, as on /computations
    computations: dict[str, Any]  # the computed_prop_* of properties, as on /computations
    cohort_ids: list[str]
    cohort_count: int
    cohort_ids_joined: str
    cohorts: dict[str, bool]


def identity(user_data: UserData | None, user_id: str, device_id: str) -> Identity:
    """`ok`, `found` and the ids as the upstream resolved them (the asked ones if unknown)."""
    data = user_data or {}
    return {
        "ok": True,
        "found": user_data is not None,
        "user_id": as_text(data.get("user_id")) or user_id or "",
        "device_id": as_text(data.get("device_id")) or device_id or "",
    }


def recommendation(rec: dict[str, Any] | None, rec_id: str) -> Recommendation:
    """One recommendation, or an empty one (found false) when Amplitude has none."""
    rec = rec or {}
    items = as_list(rec.get("items"))
    shaped = {
        "rec_id": rec_id,
        "child_rec_id": as_text(rec.get("child_rec_id")) or rec_id,
        "found": bool(rec),
        "items": items,
        **list_fields(items),
        "is_control": bool(rec.get("is_control", False)),
        "source": as_text(rec.get("recommendation_source")),
        "last_updated": iso_from_epoch_seconds(rec.get("last_updated")),
    }
    # A cast, not a literal: item_1 .. item_N are keys a TypedDict cannot name (the OpenAPI
    # document gives them as pattern properties).
    return cast(Recommendation, shaped)


def recommendations(
    user_data: UserData | None, rec_ids: list[str], user_id: str = "", device_id: str = ""
) -> RecommendationsAnswer:
    """Top level describes the first rec id; `recommendations.<rec_id>` holds each."""
    by_id = {rec.get("rec_id"): rec for rec in as_list((user_data or {}).get("recommendations"))
             if isinstance(rec, dict) and isinstance(rec.get("rec_id"), str)}
    per_id = {rec_id: recommendation(by_id.get(rec_id), rec_id) for rec_id in rec_ids}
    first = per_id[rec_ids[0]]
    return {
        **identity(user_data, user_id, device_id),
        **first,
        # found: the user is known AND Amplitude had recs (null for users inactive > 90 days).
        "found": user_data is not None and first["found"],
        "recommendations": identifier_keys(per_id),
    }


def properties(user_data: UserData | None, user_id: str = "", device_id: str = "") -> PropertiesAnswer:
    """`properties.<name>` with JSON types kept."""
    props = (user_data or {}).get("amp_props")
    return {
        **identity(user_data, user_id, device_id),
        "found": isinstance(props, dict),
        "properties": deep_identifier_keys(as_dict(props)),
    }


def computations(
    user_data: UserData | None, comp_id: str | None = None, user_id: str = "", device_id: str = ""
) -> ComputationsAnswer:
    """Computations arrive in `amp_props` as strings (`"3"`); numbers become numbers."""
    comps = {key: number_or_text(value) for key, value in as_dict((user_data or {}).get("amp_props")).items()}
    answer: ComputationsAnswer = {
        **identity(user_data, user_id, device_id),
        "found": bool(comps),
        "computations": identifier_keys(comps),
    }
    if comp_id is not None:
        # Amplitude answers one comp_id with the computation's own name as key
        # (comp_id=testCompId -> {"computed-prop-2": "3"}), so take the single value.
        # An unknown comp_id reads 0 (a number, like every computation) with comp_found false.
        answer["value"] = next(iter(comps.values())) if comps else 0
        answer["comp_found"] = bool(comps)
    return answer


def cohort_fields(cohort_ids: list[Any] | None) -> CohortFields:
    ids = [text for text in map(as_text, as_list(cohort_ids)) if text]
    return {
        "cohort_ids": ids,
        "cohort_count": len(ids),
        "cohort_ids_joined": ", ".join(ids),
        "cohorts": identifier_keys({c: True for c in ids}),
    }


def cohorts(
    user_data: UserData | None, cohort_id: str | None = None, user_id: str = "", device_id: str = ""
) -> CohortsAnswer:
    """Cohort membership; `member` answers "is this user in cohort_id?"."""
    ids = (user_data or {}).get("cohort_ids")
    fields = cohort_fields(ids)
    answer: CohortsAnswer = {**identity(user_data, user_id, device_id), "found": isinstance(ids, list), **fields}
    if cohort_id is not None:
        answer["member"] = cohort_id in fields["cohort_ids"]
    return answer


def profile(
    user_data: UserData | None, rec_ids: list[str] | None = None, user_id: str = "", device_id: str = ""
) -> ProfileAnswer:
    """Everything from one upstream call: properties (amp_props as returned), cohorts, recs."""
    props = as_dict((user_data or {}).get("amp_props"))
    # amp_props mixes properties with computations (`computed-prop-<n>`, sent as strings).
    comps = {k: number_or_text(v) for k, v in props.items() if str(k).startswith(COMPUTED_PREFIX)}
    answer: ProfileAnswer = {
        **identity(user_data, user_id, device_id),
        "properties": deep_identifier_keys({**props, **comps}),
        "computations": identifier_keys(comps),
        **cohort_fields((user_data or {}).get("cohort_ids")),
    }
    if rec_ids:
        # The recommendation fields first; `found` is the identity's (the user is known).
        return {**recommendations(user_data, rec_ids, user_id, device_id), **answer}
    return answer


__all__ = [
    "recommendation",
    "recommendations",
    "properties",
    "computations",
    "cohorts",
    "profile",
    "to_identifier",
]
