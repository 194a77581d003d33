"""The Liquid filters Braze adds to standard Liquid, as python-liquid filter functions.

Each follows Braze's documentation ("Liquid filters" / "Advanced filters"): hashes are lowercase
hex, HMACs take the key as argument, `date` understands `%s` (epoch seconds) and treats
"now" as UTC (Braze renders on UTC servers), `time_zone` converts a time for `date`.
Registered on the preview environment by `register(env)`; pure, no I/O.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil import parser as date_parser
from liquid.exceptions import FilterArgumentError
from liquid.filter import liquid_filter, string_filter
from liquid.undefined import is_undefined

# Ruby's URI.escape keeps these (RFC 2396 unreserved and reserved characters); Braze's
# url_escape is that, url_param_escape escapes everything but unreserved characters.
_URI_SAFE = "-_.!~*'();/?:@&=+$,[]"


def _digest(name: str) -> Callable[..., Any]:
    @string_filter
    def digest(value: str) -> str:
        return hashlib.new(name, value.encode()).hexdigest()

    digest.__name__ = name
    return digest


def _hmac(name: str, encoding: str) -> Callable[..., Any]:
    @string_filter
    def sign(value: str, key: Any = "") -> str:
        mac = hmac.new(str(key).encode(), value.encode(), name).digest()
        return mac.hex() if encoding == "hex" else base64.b64encode(mac).decode()

    return sign


@string_filter
def base64_encode(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


@string_filter
def url_escape(value: str) -> str:
    return quote(value, safe=_URI_SAFE)


@string_filter
def url_param_escape(value: str) -> str:
    return quote(value, safe="")


@string_filter
def json_escape(value: str) -> str:
    """The string as the inside of a JSON string literal (quotes, backslashes, controls)."""
    return json.dumps(value)[1:-1]


@liquid_filter
def property_accessor(obj: Any, key: Any) -> Any:
    """`{{hash | property_accessor: 'key'}}`: a key that Liquid's dot syntax cannot reach."""
    if isinstance(obj, dict):
        return obj.get(str(key))
    return None


@liquid_filter
def number_with_delimiter(value: Any) -> str:
    """1234567.5 -> `1,234,567.5` (Rails' number_with_delimiter with its defaults)."""
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    text = str(value) if not isinstance(value, (int, float)) else repr(value)
    whole, _, fraction = text.lstrip("-").partition(".")
    if not whole.isdigit():
        return str(value)
    grouped = f"{int(whole):,}"
    sign = "-" if number < 0 else ""
    return f"{sign}{grouped}.{fraction}" if fraction else f"{sign}{grouped}"


@string_filter
def json_parse(value: str) -> Any:
    """A JSON string as an object Liquid can read; invalid JSON is an error, as in Braze."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise FilterArgumentError(f"json_parse: invalid JSON ({exc.msg})", token=None) from None


@liquid_filter
def as_json_string(value: Any) -> str:
    if is_undefined(value):
        return "null"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def to_datetime(value: Any) -> dt.datetime | None:
    """A Liquid value as an aware datetime: "now"/"today" (UTC), epoch seconds, or a date string."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, tz=dt.UTC)
    if isinstance(value, str):
        text = value.strip()
        if text in ("now", "today"):
            return dt.datetime.now(dt.UTC)
        if text.lstrip("-").isdigit():
            return dt.datetime.fromtimestamp(int(text), tz=dt.UTC)
        try:
            parsed = date_parser.parse(text)
        except (ValueError, OverflowError):
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


@liquid_filter
def time_zone(value: Any, zone: Any = "UTC") -> Any:
    """The time in another zone, for `date`: `{{'now' | time_zone: 'Europe/Paris' | date: '%H:%M'}}`."""
    moment = to_datetime(value)
    if moment is None:
        return value
    try:
        return moment.astimezone(ZoneInfo(str(zone)))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a directory of zones
        raise FilterArgumentError(f"time_zone: unknown time zone {zone!r}", token=None) from None


@liquid_filter
def date(value: Any, fmt: Any = None) -> str:
    """strftime, plus `%s` (epoch seconds) anywhere in the format; unparsable input unchanged."""
    if is_undefined(value):
        return ""
    moment = to_datetime(value)
    if moment is None:
        return str(value)
    if fmt is None or is_undefined(fmt):
        return str(value)
    text = str(fmt).replace("%s", str(int(moment.timestamp())))
    try:
        return moment.strftime(text)
    except ValueError as exc:
        raise FilterArgumentError(str(exc), token=None) from None


FILTERS: dict[str, Any] = {
    "md5": _digest("md5"),
    "sha1": _digest("sha1"),
    "sha2": _digest("sha256"),
    "base64_encode": base64_encode,
    "hmac_sha1_hex": _hmac("sha1", "hex"),
    "hmac_sha1_base64": _hmac("sha1", "base64"),
    "hmac_sha256_hex": _hmac("sha256", "hex"),
    "hmac_sha256_base64": _hmac("sha256", "base64"),
    "url_escape": url_escape,
    "url_param_escape": url_param_escape,
    "property_accessor": property_accessor,
    "number_with_delimiter": number_with_delimiter,
    "json_escape": json_escape,
    "json_parse": json_parse,
    "as_json_string": as_json_string,
    "time_zone": time_zone,
    "date": date,
}


def register(env: Any) -> None:
    """Add Braze's filters to a python-liquid environment (replacing `date`)."""
    for name, function in FILTERS.items():
        env.add_filter(name, function)
