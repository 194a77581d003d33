"""Braze Connected Content snippets for a message template: safe to paste as they are.

Every identifier becomes the Braze expression that yields it for each recipient (never the
preview user's value), URL-escaped with `url_param_escape`; the tag carries `:basic_auth`
when the proxy requires keys, `:retry` on the rendered blocks (not on the data tags, whose
template falls back), and `:cache_max_age` from the data's TTL.
Pure: takes the template, its arguments and a `SnippetPolicy`; no Flask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from .rendering import MessageTemplate

# Query parameters that identify the recipient: each must come from a Braze attribute.
USER_KEYS = ("user_id", "device_id", "third_party_id", "tntid", "email_hash", "user_point_id",
             "user_agent_id", "user_account_id")
# Braze caches a GET's answer per URL for 5 minutes by default; `:cache_max_age` may set
# 5 minutes to 4 hours (Braze docs, "Connected Content: caching").
BRAZE_MIN_CACHE, BRAZE_MAX_CACHE = 300, 14400
_CUSTOM_ATTRIBUTE = re.compile(r"custom_attribute\.\$\{([^}]+)\}")
_OUTPUT = re.compile(r"^\{\{(.*)\}\}$", re.S)


@dataclass(frozen=True)
class SnippetPolicy:
    """What the deployment decides: the email hash expression, the Braze credential (None
    when the proxy takes no keys) and the TTL of each data endpoint, by path (None: no
    data endpoint there)."""

    email_hash_liquid: str
    credential: str | None
    ttl: Callable[[str], float | None]


def identifier_expression(template: MessageTemplate, name: str, policy: SnippetPolicy) -> str:
    """The Braze expression for one identifier: the catalog's, else the standard one."""
    if name in template.braze:
        return template.braze[name]
    if name == "user_id":
        return "{{${user_id}}}"
    if name == "email_hash":
        return policy.email_hash_liquid
    return f"{{{{custom_attribute.${{{name}}}}}}}"


def url_escaped(expression: str) -> str:
    """`{{x | f}}` -> `{{x | f | url_param_escape}}`: a value can never break the query."""
    match = _OUTPUT.match(expression.strip())
    if not match:
        return expression
    return f"{{{{{match.group(1).strip()} | url_param_escape}}}}"


def _query(template: MessageTemplate, args: Mapping[str, str], policy: SnippetPolicy) -> str:
    parts = []
    for name in template.params:
        value = args.get(name, "")
        if not value:
            continue
        if name in USER_KEYS:
            parts.append(f"{name}={url_escaped(identifier_expression(template, name, policy))}")
        else:
            parts.append(urlencode({name: value}))
    return "&".join(parts)


def cache_max_age(ttl: float) -> int:
    return int(min(max(ttl, BRAZE_MIN_CACHE), BRAZE_MAX_CACHE))


def _options(policy: SnippetPolicy, ttl: float, retry: bool = True) -> str:
    """`:retry` only where a failed call must abort the message: a rendered block would put the
    error into the email as text. A data tag's answer is saved, and the template's `found`/`ok`
    guard turns a failure into its fallback; with `:retry` Braze would abort the message after
    five more failing calls, each counted towards halting the host (bench/RESULTS.md, issue 18)."""
    options = f" :basic_auth {policy.credential}" if policy.credential else ""
    return f"{options}{' :retry' if retry else ''} :cache_max_age {cache_max_age(ttl)}"


def _ttl(path: str, policy: SnippetPolicy) -> float:
    ttl = policy.ttl(path)
    return float(BRAZE_MIN_CACHE) if ttl is None else ttl


def braze_snippets(
    template: MessageTemplate, args: Mapping[str, str], base: str, policy: SnippetPolicy
) -> dict[str, Any]:
    """Copy-paste Connected Content for the rendered block and for the JSON data, the Braze
    attributes they read, and what the operator must set up in Braze."""
    query = _query(template, args, policy)
    ttls = {path: _ttl(path, policy) for path in template.data.values()}
    render_ttl = min(ttls.values(), default=float(BRAZE_MIN_CACHE))
    render_url = f"{base}/v1/render/{template.name}?{query}"
    short = [f"{{% comment %}} {note} {{% endcomment %}}" for note in _cache_notes(ttls)]
    data_tags = [
        f"{{% connected_content {base}{path}?{query}{_options(policy, ttls[path], retry=False)} :save {data} %}}"
        for data, path in template.data.items()
    ]
    return {
        "render_html": f"{{% connected_content {render_url}{_options(policy, render_ttl)} %}}",
        "render_text": f"{{% connected_content {render_url}&format=text{_options(policy, render_ttl)} %}}",
        "data": "\n".join(short + data_tags) + ("\n" + template.liquid if template.liquid else ""),
        "attributes": _attributes(template, args, policy),
        "notes": _setup_notes(template, args, policy) + _cache_notes(ttls),
    }


def _attributes(template: MessageTemplate, args: Mapping[str, str], policy: SnippetPolicy) -> list[dict[str, Any]]:
    """Each identifier the snippets read: its expression and the custom attributes it needs."""
    out = []
    for name in template.params:
        if name in USER_KEYS and args.get(name):
            expression = identifier_expression(template, name, policy)
            out.append({"param": name, "expression": expression,
                        "custom_attributes": _CUSTOM_ATTRIBUTE.findall(expression)})
    return out


def _setup_notes(template: MessageTemplate, args: Mapping[str, str], policy: SnippetPolicy) -> list[str]:
    notes = []
    if policy.credential:
        notes.append(
            f"Create the Braze Connected Content credential `{policy.credential}` once (Settings > "
            "Connected Content > Add credential): any user name, and one of the proxy's "
            "CCPROXY_API_KEYS as password. Without it every call is a 401."
        )
    for name in template.params:
        value = args.get(name, "")
        if name not in USER_KEYS and value and value == template.defaults.get(name):
            notes.append(
                f"`{name}={value}` is the template's default (templates/catalog.toml), pasted as it is: "
                f"check it names your own {name.replace('_', ' ')} (the catalog ships the sandbox's)."
            )
    for attribute in _attributes(template, args, policy):
        for custom in attribute["custom_attributes"]:
            notes.append(
                f"`{attribute['param']}` comes from the custom attribute `{custom}`: create it in Braze "
                "(Data Settings > Custom Attributes) and fill it for every recipient; a recipient "
                "without it gets the not-found answer."
            )
        if attribute["param"] == "email_hash" and "email_hash" not in template.braze:
            notes.append(
                f"`email_hash` is computed by Braze as `{policy.email_hash_liquid}` "
                "(CCPROXY_EMAIL_HASH_LIQUID): it must hash emails exactly as your datamart does."
            )
    return notes


def _cache_notes(ttls: Mapping[str, float]) -> list[str]:
    """Where the proxy's TTL is shorter than Braze's minimum cache, say what Braze does."""
    return [
        f"{path} is fresh for {int(ttl)} s in the proxy, but Braze keeps a GET answer for at least "
        f"{BRAZE_MIN_CACHE // 60} minutes per URL: a recipient sent several messages within that time "
        "gets the first answer each time."
        for path, ttl in ttls.items() if ttl < BRAZE_MIN_CACHE
    ]
