"""Adobe Target endpoint: one visitor profile by tntid or thirdPartyId."""

from __future__ import annotations

from .. import params
from ..errors import BadRequest
from ..shape import target as shape
from . import Result, endpoint


@endpoint(
    "/v1/adobe-target/profile",
    "An Adobe Target profile's attributes by tntid or third_party_id.",
    ("tntid", "third_party_id"),
    answer=shape.TargetProfileAnswer,
    example="tntid=111492025094307-353046", kind="target_profile",
)
def profile(services, args) -> Result:
    tntid = params.identifier(args, "tntid")
    third_party_id = params.identifier(args, "third_party_id")
    if bool(tntid) == bool(third_party_id):
        raise BadRequest("give exactly one of tntid or third_party_id", code="missing_parameter")
    client = services.target
    query = {"tntid": tntid} if tntid else {"third_party_id": third_party_id}
    content = services.fallback_content("/v1/adobe-target/profile")
    lookup = services.cached(
        "target_profile", client, "profile", query,  # type: ignore[arg-type]
        lambda: client.profile(tntid=tntid, third_party_id=third_party_id),
        (lambda: fallback_profile(content)) if content is not None else None,
    )
    return Result(shape.profile(lookup.value.data, tntid or "", third_party_id or ""), lookup)


def fallback_profile(content: dict) -> dict:
    """Operator defaults `profile = {"user.memberlevel" = "..."}` as a Target profile answer."""
    return {"profileAttributes": {k: {"value": str(v)} for k, v in content.get("profile", {}).items()}}
