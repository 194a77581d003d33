"""Profile and user choice updates: where mediarithmics keeps them, and the routes that
queue them."""

from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, Response, request

from .. import params
from ..errors import BadRequest
from .submit import accepted, json_object_body, request_key, services, store

bp = Blueprint("choices", __name__)


def _profile_selector(args: Mapping[str, str]) -> dict[str, str]:
    """The user point: one of user_point_id, user_agent_id, email_hash, else the profile's own
    compartment_id + user_account_id (mediarithmics' two uses of those names)."""
    point = {k: v for k in params.USER_POINT_SELECTORS if (v := params.identifier(args, k))}
    if len(point) > 1:
        raise BadRequest("give at most one of user_point_id, user_agent_id, email_hash",
                         code="invalid_selector")
    if point:
        return point
    return {"compartment_id": args["compartment_id"], "user_account_id": args["user_account_id"]}


@bp.put("/v1/mediarithmics/profile")
def put_profile() -> Response:
    profile = json_object_body()
    args = request.args
    compartment = params.identifier(args, "compartment_id", required=True)
    account = params.identifier(args, "user_account_id", required=True)
    force_replace = params.boolean(args, "force_replace", False)
    merge_objects = None
    if not force_replace and args.get("merge_objects"):  # only read when it counts
        merge_objects = params.boolean(args, "merge_objects", False)
    write = services().mediarithmics.put_profile(
        _profile_selector(args), compartment or "", account or "", profile, force_replace,
        merge_objects)
    return accepted(store("profile", write, idem=request_key(profile)), "profile")


def processing_id_of(args: Mapping[str, str]) -> str:
    value = params.processing_id(args, required=True)
    assert value is not None
    return value


def choice_path(selector: Mapping[str, str], processing: str) -> str:
    """The outbox lane of one user choice (its write path)."""
    return services().mediarithmics.choice_path(selector, processing)


@bp.put("/v1/mediarithmics/choices")
def put_choice() -> Response:
    choice = json_object_body()
    if not isinstance(choice.get("$choice_acceptance_value"), bool):
        raise BadRequest("$choice_acceptance_value is required (true or false)", code="invalid_body")
    selector = params.user_point_selector(request.args)
    processing = processing_id_of(request.args)
    write = services().mediarithmics.put_choice(selector, processing, choice)
    return accepted(store("choice", write, idem=request_key(choice)), "choice")
