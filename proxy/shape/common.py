"""Pure helpers every shaper uses: Liquid-safe keys, flattening, list fields, dates, numbers.

Liquid reads `a.b` but needs `a["b-c"]` for a hyphen or dot, which template
authors get wrong (Braze docs), so every key the proxy emits matches IDENTIFIER.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]+")
# Canonical decimal numbers only: "007" (a code, not a number), "1e5", "NaN", "+1" stay strings.
_NUMBER = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$")
# A double holds 15 significant decimal digits exactly: longer ids stay strings.
MAX_SIGNIFICANT_DIGITS = 15


def as_dict(value: Any) -> dict[str, Any]:
    """An upstream field documented as an object; anything else (a lying upstream) reads empty."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """An upstream field documented as an array; anything else reads empty."""
    return value if isinstance(value, list) else []


def as_text(value: Any) -> str:
    """An upstream id or label: a string, or a number written out; anything else reads empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def to_identifier(key: str) -> str:
    """`computed-prop-2` -> `computed_prop_2`; runs of other characters become `_`."""
    ident = _NOT_IDENT.sub("_", str(key))
    if not ident:
        return "_"
    return "_" + ident if ident[0].isdigit() else ident


def identifier_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    """Rename keys to identifiers at this depth only, values untouched.

    Keys that collide after renaming (`a-b`, `a.b`) are resolved the same way
    whatever the input order: sorted by original key, the first keeps the name,
    the next get `_2`, `_3`...
    """
    if all(type(k) is str and IDENTIFIER.match(k) for k in mapping):
        return mapping
    out: dict[str, Any] = {}
    renamed: list[tuple[str, str]] = []
    for key in mapping:
        if type(key) is str and IDENTIFIER.match(key):
            out[key] = mapping[key]
        else:
            renamed.append((str(key), key))
    suffixes: dict[str, int] = {}
    for text, key in sorted(renamed):
        out[_free_name(out, to_identifier(text), suffixes)] = mapping[key]
    return out


def _free_name(taken: dict[str, Any], name: str, suffixes: dict[str, int]) -> str:
    """`name`, else the first free `name_2`, `name_3`...; `suffixes` remembers where the
    search for each name stopped (names are only added), so thousands of keys colliding on
    one name cost linear time, not a probe from `_2` each (an upstream chooses the keys)."""
    if name not in taken:
        return name
    n = suffixes.get(name, 2)
    while f"{name}_{n}" in taken:
        n += 1
    suffixes[name] = n + 1
    return f"{name}_{n}"


def deep_identifier_keys(value: Any) -> Any:
    """Identifier keys at every depth of a JSON value; values and list order kept."""
    if isinstance(value, dict):
        return {k: deep_identifier_keys(v) for k, v in identifier_keys(value).items()}
    if isinstance(value, list):
        return [deep_identifier_keys(v) for v in value]
    return value


def flatten(value: dict[str, Any], drop_prefix: str = "") -> dict[str, Any]:
    """Nested objects become `parent_child` keys; `drop_prefix` (e.g. `$`) is removed from keys.

    Paths that end up with the same name (`{"a": {"b": 1}, "a_b": 2}`, or `$x` and `x`) all
    stay, resolved as identifier_keys does: sorted by original path, later ones get `_2`...
    """
    pairs: list[tuple[str, tuple[str, ...], Any]] = []

    def walk(prefix: str, path: tuple[str, ...], obj: dict[str, Any]) -> None:
        for key in obj:
            name = str(key).removeprefix(drop_prefix) if drop_prefix else str(key)
            full = to_identifier(f"{prefix}_{name}" if prefix else name)
            child = obj[key]
            if isinstance(child, dict) and child:
                walk(full, path + (str(key),), child)
            else:
                pairs.append((full, path + (str(key),), child))

    walk("", (), value)
    flat: dict[str, Any] = {}
    suffixes: dict[str, int] = {}
    for name, _path, child in sorted(pairs, key=lambda pair: (pair[0], pair[1])):
        flat[_free_name(flat, name, suffixes)] = child
    return flat


def list_fields(items: Iterable[Any], prefix: str = "item") -> dict[str, Any]:
    """`item_1`..`item_N`, `item_count` and a `, `-joined string, for `{{x.item_1}}` templates."""
    items = list(items)
    fields: dict[str, Any] = {f"{prefix}_{i}": item for i, item in enumerate(items, 1)}
    fields[f"{prefix}_count"] = len(items)
    fields[f"{prefix}s_joined"] = ", ".join(display(item) for item in items)
    return fields


def display(value: Any) -> str:
    """How a value reads in a joined string: JSON-ish for bools and null."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def iso_from_epoch_seconds(value: Any) -> str:
    """1608670720 -> `2020-12-22T20:58:40Z`; anything unusable -> empty string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    try:
        moment = datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return ""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_from_epoch_millis(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return iso_from_epoch_seconds(value / 1000)


def canonical_number(value: Any) -> int | float | None:
    """The number a value stands for: a JSON number, or a string that is a canonical decimal
    (optional `-`, no leading zeros, at most 15 significant digits, optional fraction)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.match(value):
        digits = value.lstrip("-").replace(".", "").lstrip("0")
        if len(digits) <= MAX_SIGNIFICANT_DIGITS:
            return float(value) if "." in value else int(value)
    return None


def number_or_text(value: Any) -> Any:
    """`"3"` -> 3, `"5000000.0"` -> 5000000.0; other values unchanged."""
    number = canonical_number(value) if isinstance(value, str) else None
    return value if number is None else number


def numbers(mapping: dict[str, Any]) -> dict[str, int | float]:
    """`numbers.<name>`: every value of an open map that is a number or a canonical decimal
    string, as a number, so `{% if x.numbers.points > 2000 %}` compares numbers."""
    out = {}
    for key, value in mapping.items():
        number = canonical_number(value)
        if number is not None:
            out[key] = number
    return out


def iso_from_text(value: Any) -> str:
    """An ISO 8601 timestamp as `YYYY-MM-DDTHH:MM:SSZ` in UTC (milliseconds and offsets
    dropped); anything unusable -> empty string."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
