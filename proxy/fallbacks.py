"""The operator's fallback content (`CCPROXY_FALLBACKS_FILE`): what an endpoint answers,
shaped as its upstream would, when the upstream fails and nothing stale is left.

Read once per app, and by `ccproxy serve` and `ccproxy check` before anything starts, so a
file that cannot work stops start-up instead of failing answers at send time. Imports
nothing heavy: `serve`'s master reads it before it forks.
"""

from __future__ import annotations

import math
import tomllib
from typing import Any

from .errors import SettingsError


def load_fallbacks(path: str) -> dict[str, dict[str, Any]]:
    """Fallback content by endpoint path, from a TOML file (empty without one)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"CCPROXY_FALLBACKS_FILE {path} cannot be read: {exc}") from None
    fallbacks = {route: dict(content) for route, content in data.items() if isinstance(content, dict)}
    where = _not_json(fallbacks)
    if where:
        # TOML has dates and inf/nan, which JSON has not: refused at start, not at send time.
        raise SettingsError(f"CCPROXY_FALLBACKS_FILE {path}: {where} is a date, inf or nan, "
                            "which JSON cannot carry; write it as a string")
    return fallbacks


def _not_json(value: Any, where: str = "") -> str:
    """The place (`route.key[0]`) of the first value JSON cannot carry, or ""."""
    if isinstance(value, dict):
        children: Any = ((f"{where}.{key}" if where else str(key), child) for key, child in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{i}]", child) for i, child in enumerate(value))
    elif isinstance(value, float):
        return "" if math.isfinite(value) else where
    else:
        return "" if value is None or isinstance(value, (str, int)) else where
    for place, child in children:
        found = _not_json(child, place)
        if found:
            return found
    return ""
