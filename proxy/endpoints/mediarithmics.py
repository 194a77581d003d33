"""mediarithmics read endpoints: user profile, user choices and a choice's history."""

from __future__ import annotations

from .. import params
from ..shape import mediarithmics as shape
from . import Result, endpoint

SELECTOR = ("user_point_id", "user_agent_id", "email_hash", "compartment_id", "user_account_id")


def processing_id(args, required: bool = False) -> str | None:
    value = params.identifier(args, "processing_id", required=required)
    if value is not None and not (value.isdigit() and value.isascii() and len(value) <= 32):
        raise params.BadRequest("processing_id must be a number of at most 32 digits", code="invalid_parameter")
    return value


@endpoint(
    "/v1/mediarithmics/profile",
    "A mediarithmics user profile, nested fields flattened with `_`.",
    SELECTOR,
    answer=shape.MediarithmicsProfileAnswer,
    example="user_point_id=up-1", kind="mediarithmics_profile",
)
def profile(services, args) -> Result:
    selector = params.user_point_selector(args)
    client = services.mediarithmics
    content = services.fallback_content("/v1/mediarithmics/profile")
    lookup = services.cached(
        "mediarithmics_profile", client, "user_profiles", selector, lambda: client.profiles(selector),
        (lambda: [dict(content.get("profile", {}))]) if content is not None else None,
    )
    return Result(shape.profile(lookup.value.data), lookup)


@endpoint(
    "/v1/mediarithmics/choices",
    "User choices (consents): `choices.processing_<id>` and each choice flattened.",
    SELECTOR + ("processing_id",),
    answer=shape.ChoicesAnswer,
    example="email_hash=abc", kind="choices",
)
def choices(services, args) -> Result:
    selector = params.user_point_selector(args)
    processing = processing_id(args)
    client = services.mediarithmics
    query = {**selector, **({"processing_id": processing} if processing else {})}
    content = services.fallback_content("/v1/mediarithmics/choices")
    lookup = services.cached(
        "choices", client, "user_choices", query, lambda: client.choices(selector, processing),
        (lambda: fallback_choices(content)) if content is not None else None,
    )
    return Result(shape.choices(lookup.value.data, processing), lookup)


@endpoint(
    "/v1/mediarithmics/choices/history",
    "The change log of one user choice, newest first.",
    SELECTOR + ("processing_id",),
    required=("processing_id",),
    answer=shape.HistoryAnswer,
    example="user_point_id=up-2&processing_id=101", kind="choices",
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


def fallback_choices(content: dict) -> list[dict]:
    """Operator defaults `choices = {"101" = false}` as a user choices list."""
    return [
        {"$processing_id": str(pid), "$choice_acceptance_value": bool(accepted)}
        for pid, accepted in content.get("choices", {}).items()
    ]
