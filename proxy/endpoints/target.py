"""Adobe Target endpoint: one visitor profile by tntid or thirdPartyId."""

from __future__ import annotations

from collections.abc import Mapping

from .. import params
from ..errors import BadRequest
from ..shape import target as shape
from . import Context, Result, endpoint


@endpoint(
    "/v1/adobe-target/profile",
    "An Adobe Target profile's attributes by tntid or third_party_id.",
    ("tntid", "third_party_id"),
    answer=shape.TargetProfileAnswer,
    example="tntid=111492025094307-353046",
    ttl=lambda s: s.cache_ttl_target_profile,
)
def profile(ctx: Context, args: Mapping[str, str]) -> Result:
    tntid = params.identifier(args, "tntid")
    third_party_id = params.identifier(args, "third_party_id")
    if bool(tntid) == bool(third_party_id):
        raise BadRequest("give exactly one of tntid or third_party_id", code="missing_parameter")
    lookup = ctx.fetch(ctx.services.target.profile(tntid=tntid, third_party_id=third_party_id))
    return Result.shaped(lookup, shape.profile, tntid or "", third_party_id or "")
