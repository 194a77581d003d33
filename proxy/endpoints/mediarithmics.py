"""mediarithmics read endpoints: user profile, user choices and a choice's history."""

from __future__ import annotations

from collections.abc import Mapping

from .. import params
from ..shape import mediarithmics as shape
from . import Context, Result, endpoint

Args = Mapping[str, str]


@endpoint(
    "/v1/mediarithmics/profile",
    "A mediarithmics user profile, nested fields flattened with `_`.",
    params.USER_POINT_PARAMS,
    answer=shape.MediarithmicsProfileAnswer,
    example="user_point_id=up-1",
    ttl=lambda s: s.cache_ttl_mediarithmics_profile,
)
def profile(ctx: Context, args: Args) -> Result:
    selector = params.user_point_selector(args)
    lookup = ctx.fetch(ctx.services.mediarithmics.profiles(selector))
    return Result.shaped(lookup, shape.profile)


@endpoint(
    "/v1/mediarithmics/choices",
    "User choices (consents): `choices.processing_<id>` and each choice flattened; with `processing_id`, that one's `accepted`.",
    params.USER_POINT_PARAMS + ("processing_id",),
    answer=shape.ChoicesAnswer,
    example="email_hash=abc",
    ttl=lambda s: s.cache_ttl_choices,
)
def choices(ctx: Context, args: Args) -> Result:
    selector = params.user_point_selector(args)
    processing = params.processing_id(args)
    lookup = ctx.fetch(ctx.services.mediarithmics.choices(selector, processing))
    return Result.shaped(lookup, shape.choices, processing)


@endpoint(
    "/v1/mediarithmics/choices/history",
    "The change log of one user choice, newest first.",
    params.USER_POINT_PARAMS + ("processing_id",),
    required=("processing_id",),
    answer=shape.HistoryAnswer,
    example="user_point_id=up-2&processing_id=101",
    ttl=lambda s: s.cache_ttl_choices,
)
def choice_history(ctx: Context, args: Args) -> Result:
    selector = params.user_point_selector(args)
    processing = params.processing_id(args, required=True)
    assert processing is not None
    lookup = ctx.fetch(ctx.services.mediarithmics.choice_history(selector, processing))
    return Result.shaped(lookup, shape.history, processing)
