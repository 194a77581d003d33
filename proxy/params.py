"""Query-string validation shared by every endpoint; raises BadRequest with a clear message.

Only the parameters an endpoint names are read, so unknown names (Braze users
add cache busters) never reach an upstream call or a cache key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import BadRequest
from .json_depth import MAX_DEPTH, nesting_exceeds
from .shape.common import number_or_text

MAX_ID_LENGTH = 256
MAX_LIST_LENGTH = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Args = Mapping[str, str]


def json_body(request: Any) -> Any:
    """A request's JSON body, or None when absent or unreadable, a body nested too deep for
    the parser included (Flask's silent mode lets RecursionError through: a 500)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None

# The JSON Schema of every query parameter, built from the same limits the validators
# below enforce; the OpenAPI document reads it, so docs and checks cannot disagree.
_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": "^[^\\x00-\\x1f\\x7f]*$"}
_LIST = {**_ID, "description": f"comma-separated, at most {MAX_LIST_LENGTH} values"}
PARAM_SCHEMAS: dict[str, dict] = {
    "user_id": _ID, "device_id": _ID, "rec_id": _LIST, "comp_id": _ID, "cohort_id": _ID,
    "rec_type": {"type": "string", "enum": ["model", "random"]},
    "flag_keys": _LIST,
    "context": {"type": "string", "maxLength": 8192,
                "description": 'a JSON object, e.g. {"user_properties":{"premium":true}}'},
    "track": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
    "tntid": _ID, "third_party_id": _ID,
    "user_point_id": _ID, "user_agent_id": _ID, "email_hash": _ID,
    "compartment_id": _ID, "user_account_id": _ID,
    "processing_id": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 32},
    "format": {"type": "string", "enum": ["html", "text"]},
}


def identifier(args: Args, name: str, *, required: bool = False) -> str | None:
    """One id-like value: at most 256 characters, no control characters."""
    value = args.get(name)
    if value is None or value == "":
        if required:
            raise BadRequest(f"the query parameter {name} is required", code="missing_parameter")
        return None
    if len(value) > MAX_ID_LENGTH:
        raise BadRequest(
            f"{name} is longer than {MAX_ID_LENGTH} characters", code="invalid_parameter"
        )
    if _CONTROL.search(value):
        raise BadRequest(f"{name} contains control characters", code="invalid_parameter")
    return value


def id_list(args: Args, name: str, *, required: bool = False) -> list[str]:
    """A comma-separated list of ids (`rec_id=a,b`), blanks dropped, duplicates removed."""
    raw = identifier(args, name, required=required) if name in args else None
    if raw is None:
        if required:
            raise BadRequest(f"the query parameter {name} is required", code="missing_parameter")
        return []
    values = list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not values and required:
        raise BadRequest(f"the query parameter {name} is required", code="missing_parameter")
    if len(values) > MAX_LIST_LENGTH:
        raise BadRequest(f"{name} lists more than {MAX_LIST_LENGTH} values", code="invalid_parameter")
    return values


def choice(args: Args, name: str, allowed: tuple[str, ...]) -> str | None:
    """An optional value that must be one of `allowed`."""
    value = args.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise BadRequest(
            f"{name} must be one of {', '.join(allowed)}", code="invalid_parameter"
        )
    return value


def boolean(args: Args, name: str, default: bool) -> bool:
    """true/false (also 1/0, yes/no); anything else is a 400."""
    value = args.get(name)
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false", code="invalid_parameter")


def user_ref(args: Args) -> tuple[str, str]:
    """`user_id` and/or `device_id`; at least one is required (Amplitude's own rule)."""
    user_id = identifier(args, "user_id")
    device_id = identifier(args, "device_id")
    if not user_id and not device_id:
        raise BadRequest("give user_id or device_id", code="missing_parameter")
    return user_id or "", device_id or ""


def processing_id(args: Args, required: bool = False) -> str | None:
    """A mediarithmics processing (the consent purpose): a number of at most 32 digits."""
    value = identifier(args, "processing_id", required=required)
    if value is not None and not (value.isdigit() and value.isascii() and len(value) <= 32):
        raise BadRequest("processing_id must be a number of at most 32 digits", code="invalid_parameter")
    return value


def json_object(args: Args, name: str) -> dict:
    """A JSON object passed as one query parameter (`context={"user_properties":{...}}`)."""
    raw = args.get(name)
    if raw is None or raw == "":
        return {}
    if len(raw) > 8192:
        raise BadRequest(f"{name} is longer than 8192 characters", code="invalid_parameter")
    too_deep = BadRequest(f"{name} nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        value = json.loads(raw)
    except ValueError:
        raise BadRequest(f"{name} is not valid JSON", code="invalid_json") from None
    except RecursionError:  # 8,192 characters can nest past the parser's own recursion limit
        raise too_deep from None
    if nesting_exceeds(value, MAX_DEPTH):
        raise too_deep
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a JSON object", code="invalid_json")
    return value


def prefixed(args: Args, prefix: str) -> dict[str, str]:
    """Parameters named `<prefix><name>` (e.g. `user_properties.premium=true`) as {name: value}."""
    found: dict[str, str] = {}
    for key in args:
        if key.startswith(prefix) and len(key) > len(prefix):
            found[key[len(prefix):]] = identifier(args, key) or ""
    if len(found) > MAX_LIST_LENGTH:
        raise BadRequest(f"more than {MAX_LIST_LENGTH} {prefix}* parameters", code="invalid_parameter")
    return found


def scalar(text: str) -> Any:
    """`true`/`false` and plain numbers as JSON values, other text as is."""
    if text in ("true", "false"):
        return text == "true"
    return number_or_text(text)


USER_POINT_SELECTORS = ("user_point_id", "user_agent_id", "email_hash")
# Every parameter that may name a mediarithmics user point (the account pair goes together).
USER_POINT_PARAMS = (*USER_POINT_SELECTORS, "compartment_id", "user_account_id")


def user_point_selector(args: Args) -> dict[str, str]:
    """Exactly one mediarithmics selector: user_point_id, user_agent_id, email_hash,
    or compartment_id together with user_account_id."""
    given = {name: identifier(args, name) for name in USER_POINT_SELECTORS}
    chosen = {name: value for name, value in given.items() if value}
    account = {name: identifier(args, name) for name in ("compartment_id", "user_account_id")}
    if any(account.values()):
        if not all(account.values()):
            raise BadRequest(
                "compartment_id and user_account_id go together", code="invalid_selector"
            )
        chosen.update(account)  # type: ignore[arg-type]
    if not chosen or (len(chosen) > 1 and set(chosen) != {"compartment_id", "user_account_id"}):
        raise BadRequest(
            "give exactly one of user_point_id, user_agent_id, email_hash, "
            "or compartment_id with user_account_id",
            code="invalid_selector",
        )
    return chosen  # type: ignore[return-value]
