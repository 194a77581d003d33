"""User activities: mediarithmics' documented rules for one, and the route that queues it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, request

from .. import params
from ..errors import BadRequest
from .submit import accepted, request_key, services, store

bp = Blueprint("activities", __name__)
LEGACY_IDS = ("$user_agent_id", "$email_hash")


def activity_problem(activity: Any) -> str | None:
    """Why a user activity would be refused, or None (mediarithmics' documented rules)."""
    if not isinstance(activity, dict):
        return "the activity must be a JSON object (Content-Type: application/json)"
    identifiers = activity.get("$user_identifiers")
    if identifiers is not None and (
        not isinstance(identifiers, list) or not identifiers
        or not all(isinstance(i, dict) for i in identifiers)
    ):
        return "$user_identifiers must be a non-empty list of identifier objects"
    legacy = any(activity.get(k) for k in LEGACY_IDS) or (
        activity.get("$user_account_id") and activity.get("$compartment_id"))
    if not identifiers and not legacy:
        return ("identify the user with $user_identifiers (or a legacy $user_agent_id, $email_hash, "
                "or $user_account_id with $compartment_id)")
    if not isinstance(activity.get("$type"), str) or not activity["$type"].strip():
        return "$type is required (a string such as TOUCH or SITE_VISIT)"
    ts = activity.get("$ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
        return "$ts is required: the time in epoch milliseconds (an integer)"
    return None


def user_identifiers(selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """A user point selector as activity `$user_identifiers`."""
    if "user_agent_id" in selector:
        return [{"$type": "USER_AGENT", "$user_agent_id": selector["user_agent_id"]}]
    if "email_hash" in selector:
        return [{"$type": "USER_EMAIL", "$hash": selector["email_hash"]}]
    if "user_point_id" in selector:
        return [{"$type": "USER_POINT", "$user_point_id": selector["user_point_id"]}]
    return [{"$type": "USER_ACCOUNT", "$compartment_id": selector["compartment_id"],
             "$user_account_id": selector["user_account_id"]}]


@bp.post("/v1/mediarithmics/activities")
def post_activity() -> Response:
    activity = params.json_body(request)
    problem = activity_problem(activity)
    if problem:
        raise BadRequest(problem, code="invalid_activity")
    added = store("activity", services().mediarithmics.post_activity(activity),
                  idem=request_key(activity), sheddable=True)
    return accepted(added, "activity")
