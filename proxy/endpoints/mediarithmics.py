"""mediarithmics read endpoints: user profile, user choices and a choice's history."""

from __future__ import annotations

from .. import params
from ..shape import mediarithmics as shape
from . import Result, endpoint

SELECTOR = ("user_point_id", "user_agent_id", "email_hash", "compartment_id", "user_account_id")


def processing_id(args, required: bool = False) -> str | None:
    value = params.identifier(args, "processing_id", required=required)
    if value is not None and not value.isdigit():
        raise params.BadRequest("processing_id must be a number", code="invalid_parameter")
    return value


@endpoint(
    "/v1/mediarithmics/profile",
    "A mediarithmics user profile, nested fields flattened with `_`.",
    SELECTOR,
)
def profile(services, args) -> Result:
    selector = params.user_point_selector(args)
    client = services.mediarithmics
    lookup = services.cached(
        "mediarithmics_profile", client, "user_profiles", selector, lambda: client.profiles(selector)
    )
    return Result(shape.profile(lookup.value.data), lookup)


@endpoint(
    "/v1/mediarithmics/choices",
    "User choices (consents): `choices.processing_<id>` and each choice flattened.",
    SELECTOR + ("processing_id",),
)
def choices(services, args) -> Result:
    selector = params.user_point_selector(args)
    processing = processing_id(args)
    client = services.mediarithmics
    query = {**selector, **({"processing_id": processing} if processing else {})}
    lookup = services.cached(
        "choices", client, "user_choices", query, lambda: client.choices(selector, processing)
    )
    return Result(shape.choices(lookup.value.data, processing), lookup)


@endpoint(
    "/v1/mediarithmics/choices/history",
    "The change log of one user choice, newest first.",
    SELECTOR + ("processing_id",),
)
def choice_history(services, args) -> Result:
    selector = params.user_point_selector(args)
    processing = processing_id(args, required=True)
    assert processing is not None
    client = services.mediarithmics
    query = {**selector, "processing_id": processing}
    lookup = services.cached(
        "choices", client, "choice_change_log", query,
        lambda: client.choice_history(selector, processing),
    )
    return Result(shape.history(lookup.value.data, processing), lookup)
