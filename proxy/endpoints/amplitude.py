"""Amplitude User Profile endpoints: recommendations, properties, computations, cohorts, profile."""

from __future__ import annotations

from collections.abc import Mapping

from .. import params
from ..shape import amplitude as shape
from . import Context, Result, endpoint

USER = ("user_id", "device_id")
Args = Mapping[str, str]


def _rec_type(args: Args) -> str | None:
    return params.choice(args, "rec_type", ("model", "random"))


@endpoint(
    "/v1/amplitude/recommendations",
    "Recommendations for one user; top level describes the first rec_id.",
    USER + ("rec_id", "rec_type"),
    required=("rec_id",),
    answer=shape.RecommendationsAnswer,
    example="user_id=testUser&rec_id=testRecId,testRecId2",
    ttl=lambda s: s.cache_ttl_recommendations,
)
def recommendations(ctx: Context, args: Args) -> Result:
    rec_ids = params.id_list(args, "rec_id", required=True)
    rec_type = _rec_type(args)
    user_id, device_id = params.user_ref(args)
    query = ctx.services.amplitude.recommendations(user_id, device_id, rec_ids, rec_type)
    # "No recommendations for now": every template has that branch, and Braze's :retry
    # cannot outlast a Retry-After (README, "Rate limited recommendations").
    lookup = ctx.fetch(query, when_limited=ctx.services.settings.recommendations_rate_limit_fallback)
    return Result.shaped(lookup, shape.recommendations, rec_ids, user_id, device_id)


@endpoint("/v1/amplitude/properties", "User properties (computations excluded).", USER,
          answer=shape.PropertiesAnswer, example="user_id=testUser",
          ttl=lambda s: s.cache_ttl_properties)
def properties(ctx: Context, args: Args) -> Result:
    user_id, device_id = params.user_ref(args)
    lookup = ctx.fetch(ctx.services.amplitude.properties(user_id, device_id))
    return Result.shaped(lookup, shape.properties, user_id, device_id)


@endpoint(
    "/v1/amplitude/computations",
    "Computed properties as numbers where numeric; comp_id picks one into `value`.",
    USER + ("comp_id",),
    answer=shape.ComputationsAnswer,
    example="user_id=testUser&comp_id=testCompId",
    ttl=lambda s: s.cache_ttl_computations,
)
def computations(ctx: Context, args: Args) -> Result:
    comp_id = params.identifier(args, "comp_id")
    user_id, device_id = params.user_ref(args)
    lookup = ctx.fetch(ctx.services.amplitude.computations(user_id, device_id, comp_id))
    return Result.shaped(lookup, shape.computations, comp_id, user_id, device_id)


@endpoint(
    "/v1/amplitude/cohorts",
    "Tracked cohort membership; cohort_id answers `member`.",
    USER + ("cohort_id",),
    answer=shape.CohortsAnswer,
    example="user_id=testUser&cohort_id=cohort3",
    ttl=lambda s: s.cache_ttl_cohorts,
)
def cohorts(ctx: Context, args: Args) -> Result:
    cohort_id = params.identifier(args, "cohort_id")
    user_id, device_id = params.user_ref(args)
    lookup = ctx.fetch(ctx.services.amplitude.cohorts(user_id, device_id))
    return Result.shaped(lookup, shape.cohorts, cohort_id, user_id, device_id)


@endpoint(
    "/v1/amplitude/profile",
    "Properties, computations, cohorts and (with rec_id) recommendations from one upstream call.",
    USER + ("rec_id", "rec_type"),
    answer=shape.ProfileAnswer,
    example="user_id=testUser&rec_id=testRecId",
    ttl=lambda s: s.cache_ttl_profile,
)
def profile(ctx: Context, args: Args) -> Result:
    rec_ids = params.id_list(args, "rec_id")
    rec_type = _rec_type(args) if rec_ids else None
    user_id, device_id = params.user_ref(args)
    lookup = ctx.fetch(ctx.services.amplitude.profile(user_id, device_id, rec_ids, rec_type))
    return Result.shaped(lookup, shape.profile, rec_ids, user_id, device_id)
