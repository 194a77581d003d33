"""Amplitude User Profile endpoints: recommendations, properties, computations, cohorts, profile."""

from __future__ import annotations

from .. import params
from ..shape import amplitude as shape
from . import Result, endpoint

USER = ("user_id", "device_id")


def _userprofile(services, args, kind: str, path: str, flags: dict[str, str], rec_ids=()):
    """Validate the user, then one cached call to /v1/userprofile with `flags`."""
    user_id, device_id = params.user_ref(args)
    query = {k: v for k, v in (("user_id", user_id), ("device_id", device_id)) if v}
    query.update(flags)
    client = services.amplitude
    content = services.fallback_content(path)
    fallback = when_limited = None
    if content is not None:
        fallback = lambda: fallback_user_data(content, list(rec_ids), user_id, device_id)  # noqa: E731
    if kind == "recommendations" and services.settings.recommendations_rate_limit_fallback:
        # "No recommendations for now": every template has that branch, and Braze's :retry
        # cannot outlast a Retry-After (README, "Rate limited recommendations").
        when_limited = lambda: fallback_user_data({}, list(rec_ids), user_id, device_id)  # noqa: E731
    lookup = services.cached(
        kind, client, "userprofile", query, lambda: client.userprofile(query), fallback, when_limited
    )
    return user_id, device_id, lookup


def fallback_user_data(content: dict, rec_ids: list[str], user_id: str, device_id: str) -> dict:
    """The operator's fallback content as a `userData` answer, so it is shaped like real data:
    `items` (for every rec id), `properties`, `computations`, `cohort_ids`."""
    recs = [
        {"rec_id": r, "child_rec_id": r, "items": list(content.get("items", [])),
         "is_control": False, "recommendation_source": "fallback"}
        for r in rec_ids
    ] if "items" in content else None
    props = {**content.get("properties", {}), **content.get("computations", {})}
    return {"recommendations": recs, "user_id": user_id, "device_id": device_id,
            "amp_props": props or None, "cohort_ids": content.get("cohort_ids")}


def _rec_flags(args, rec_ids: list[str]) -> dict[str, str]:
    rec_type = params.choice(args, "rec_type", ("model", "random"))
    # Sorted so that rec_id=a,b and rec_id=b,a share one cache entry; order is
    # restored by the shaper.
    flags = {"get_recs": "true", "rec_id": ",".join(sorted(rec_ids))}
    if rec_type:
        flags["rec_type"] = rec_type
    return flags


@endpoint(
    "/v1/amplitude/recommendations",
    "Recommendations for one user; top level describes the first rec_id.",
    USER + ("rec_id", "rec_type"),
    required=("rec_id",),
    answer=shape.RecommendationsAnswer,
    example="user_id=testUser&rec_id=testRecId,testRecId2", kind="recommendations",
)
def recommendations(services, args) -> Result:
    rec_ids = params.id_list(args, "rec_id", required=True)
    flags = _rec_flags(args, rec_ids)
    user_id, device_id, lookup = _userprofile(
        services, args, "recommendations", "/v1/amplitude/recommendations", flags, rec_ids
    )
    return Result(shape.recommendations(lookup.value.data, rec_ids, user_id, device_id), lookup)


@endpoint("/v1/amplitude/properties", "User properties (computations excluded).", USER,
          answer=shape.PropertiesAnswer, example="user_id=testUser", kind="properties")
def properties(services, args) -> Result:
    user_id, device_id, lookup = _userprofile(
        services, args, "properties", "/v1/amplitude/properties", {"get_amp_props": "true"}
    )
    return Result(shape.properties(lookup.value.data, user_id, device_id), lookup)


@endpoint(
    "/v1/amplitude/computations",
    "Computed properties as numbers where numeric; comp_id picks one into `value`.",
    USER + ("comp_id",),
    answer=shape.ComputationsAnswer,
    example="user_id=testUser&comp_id=testCompId", kind="computations",
)
def computations(services, args) -> Result:
    comp_id = params.identifier(args, "comp_id")
    flags = {"comp_id": comp_id} if comp_id else {"get_computations": "true"}
    user_id, device_id, lookup = _userprofile(
        services, args, "computations", "/v1/amplitude/computations", flags
    )
    return Result(shape.computations(lookup.value.data, comp_id, user_id, device_id), lookup)


@endpoint(
    "/v1/amplitude/cohorts",
    "Tracked cohort membership; cohort_id answers `member`.",
    USER + ("cohort_id",),
    answer=shape.CohortsAnswer,
    example="user_id=testUser&cohort_id=cohort3", kind="cohorts",
)
def cohorts(services, args) -> Result:
    cohort_id = params.identifier(args, "cohort_id")
    user_id, device_id, lookup = _userprofile(
        services, args, "cohorts", "/v1/amplitude/cohorts", {"get_cohort_ids": "true"}
    )
    return Result(shape.cohorts(lookup.value.data, cohort_id, user_id, device_id), lookup)


@endpoint(
    "/v1/amplitude/profile",
    "Properties, computations, cohorts and (with rec_id) recommendations from one upstream call.",
    USER + ("rec_id", "rec_type"),
    answer=shape.ProfileAnswer,
    example="user_id=testUser&rec_id=testRecId", kind="profile",
)
def profile(services, args) -> Result:
    rec_ids = params.id_list(args, "rec_id")
    flags = {"get_amp_props": "true", "get_cohort_ids": "true", "get_computations": "true"}
    if rec_ids:
        flags.update(_rec_flags(args, rec_ids))
    user_id, device_id, lookup = _userprofile(
        services, args, "profile", "/v1/amplitude/profile", flags, rec_ids
    )
    return Result(shape.profile(lookup.value.data, rec_ids, user_id, device_id), lookup)
