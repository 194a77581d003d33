"""The OpenAPI 3.1 document of an app, generated from its endpoint registry (paths, parameters,
summaries), the parameter schemas in `params.py` and the TypedDicts of the flat answers,
so it cannot drift from the code; and the README's endpoint reference, generated from it.

    python -m proxy.openapi            # the document as JSON
    python -m proxy.openapi --markdown # the README reference section
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

from . import __version__
from .params import PARAM_SCHEMAS, USER_POINT_PARAMS, USER_POINT_SELECTORS
from .shape.amplitude import Recommendation

if TYPE_CHECKING:
    from flask import Flask

# Keys a TypedDict cannot name: the numbered list fields.
PATTERN_PROPERTIES: dict[Any, dict[str, Any]] = {
    Recommendation: {"^item_[0-9]+$": {}},
}
PROVENANCE = {
    "stale": {"type": "boolean", "description": "older than its TTL: served because the upstream is slow or failing"},
    "fallback": {"type": "boolean", "description": "operator default content: the data could not be had"},
}
ERROR = {
    "type": "object",
    "required": ["ok", "error"],
    "properties": {
        "ok": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z_]+$"},
                "message": {"type": "string"},
                "template": {"type": "string"},
                "line": {"type": ["integer", "null"]},
            },
        },
    },
}
HEADERS = {
    "X-Cache": {"description": "HIT, MISS, STALE or FALLBACK", "schema": {"type": "string"}},
    "Cache-Control": {"description": "max-age = seconds of freshness left", "schema": {"type": "string"}},
    "Age": {"description": "seconds since the upstream answered (hits)", "schema": {"type": "string"}},
    "X-Request-Id": {"description": "the caller's id, or a new one", "schema": {"type": "string"}},
}
LINT_WARNING = {"type": "object", "required": ["line", "code", "message"],
                "properties": {"line": {"type": "integer"}, "code": {"type": "string", "pattern": "^[a-z_]+$"},
                               "message": {"type": "string"}}}
# Examples that run as written against `ccproxy demo` (a test runs every README example).
EXAMPLE_ACTIVITY = {"$type": "TOUCH", "$ts": 1735689600000,
                    "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "abc"}]}
CONSENT_LINK_EXAMPLE = "email_hash=abc&processing_id=101&accept=false"
PIXEL_LINK_EXAMPLE = "email_hash=abc&event=email_open&campaign=spring"
RETRY_AFTER = {"Retry-After": {"description": "seconds before trying again", "schema": {"type": "string"}}}


def schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a Python annotation (TypedDicts become `$defs` entries)."""
    if tp is Any or tp is object:
        return {}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        return {"type": "array", "items": schema_of(item, defs)}
    if origin is dict:
        _key, value = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": schema_of(value, defs)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_of(arg, defs) for arg in get_args(tp)]}
    if typing.is_typeddict(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            hints = get_type_hints(tp)
            patterns = {}
            # TypedDicts flatten their bases away, so match a base by its keys.
            for base, extra in PATTERN_PROPERTIES.items():
                if set(get_type_hints(base)) <= set(hints):
                    patterns.update(extra)
            defs[name] = {
                "type": "object",
                "properties": {key: schema_of(hint, defs) for key, hint in hints.items()},
                "required": sorted(tp.__required_keys__),
                # Strict: a field added to a shaper but not to its TypedDict fails the tests.
                "additionalProperties": False,
                **({"patternProperties": patterns} if patterns else {}),
            }
        return {"$ref": f"#/components/schemas/{name}"}
    raise TypeError(f"no JSON Schema for {tp!r}")


def _parameter(name: str, required: bool) -> dict[str, Any]:
    schema = dict(PARAM_SCHEMAS.get(name, {"type": "string"}))
    description = schema.pop("description", None)
    param = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        param["description"] = description
    return param


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**({"Retry-After": RETRY_AFTER["Retry-After"]} if retry else {})},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


COMMON_ERRORS = {
    "400": _error("bad input: missing or malformed parameter"),
    "401": _error("a valid API key is required"),
    "502": _error("the upstream refused the proxy's credential, or answered an unexpected 4xx"),
    "503": _error("transient upstream failure and no stale answer or fallback; or not configured", True),
}


PREVIEW_BUSY = _error("every preview slot of the answering process is taken (preview_busy)", True)


def _json_answer(ref: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "headers": HEADERS,
            "content": {"application/json": {"schema": ref}}}


def _text_answer(description: str) -> dict[str, Any]:
    return {"description": description, "headers": HEADERS,
            "content": {"text/html": {"schema": {"type": "string"}},
                        "text/plain": {"schema": {"type": "string"}}}}


def _plain(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(app: Flask) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of `app`: the data endpoints from its registry, every
    other path from its URL map, each documented by the operations of its view
    (`operations`)."""
    from .services import of_app

    defs: dict[str, Any] = {"Error": ERROR}
    paths: dict[str, Any] = {}
    for endpoint in of_app(app).endpoints.values():
        ref = schema_of(endpoint.answer, defs)
        name = ref["$ref"].rsplit("/", 1)[1]
        defs[name]["properties"].update(PROVENANCE)
        defs[name]["required"] = sorted(set(defs[name]["required"]) | set(PROVENANCE))
        paths[endpoint.path] = {"get": {
            "summary": endpoint.summary,
            "operationId": endpoint.path.strip("/").replace("/", "_").replace("-", "_"),
            "parameters": [_parameter(p, p in endpoint.required) for p in endpoint.params],
            "responses": {"200": _json_answer(ref, "the flat answer (found: false when unknown)"),
                          **COMMON_ERRORS},
            **({"x-example": endpoint.example} if endpoint.example else {}),
        }}
    views = {rule.endpoint: rule for rule in app.url_map.iter_rules()}
    for view, documented in operations().items():
        rule = views.pop(view)  # a KeyError: documentation of a route the app does not have
        path = openapi_path(rule.rule)
        for method, op in documented.items():
            assert method.upper() in (rule.methods or ()), f"{method} {rule.rule} is not routed"
            paths.setdefault(path, {})[method] = op
    undocumented = sorted(rule.rule for rule in views.values())
    if undocumented:
        raise ValueError(f"routes without OpenAPI operations: {undocumented}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "connected-content-proxy", "version": __version__,
                 "description": "Flat, Liquid-friendly JSON for Braze Connected Content. Every key in an "
                                "answer is a Liquid identifier. Give user_id or device_id where both are listed."},
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}},
        },
        "security": [{"bearer": []}, {"basic": []}, {"apiKey": []}, {}],
        "paths": paths,
    }


def openapi_path(rule: str) -> str:
    """`/v1/render/<name>` -> `/v1/render/{name}` (converters dropped)."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def operations() -> dict[str, dict[str, Any]]:
    """The operations of every Flask view, by its endpoint name (`blueprint.function`), in
    the document's order; their paths come from the URL map."""
    ops: dict[str, dict[str, Any]] = {}
    name_param = {"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"}}
    any_params = [_parameter(p, False) for p in ("user_id", "device_id", "rec_id", "flag_keys",
                                                   "third_party_id", "tntid", "email_hash", "processing_id")]
    ops["messages.render_template"] = {"get": {
        "summary": "A message template rendered with the proxy's data (Braze inserts it as text).",
        "operationId": "v1_render",
        "parameters": [name_param, _parameter("format", False), *any_params],
        "responses": {"200": _text_answer("the rendered block"),
                      "404": _error("no such template"),
                      "422": _error("the template failed (names the file and line), or went over a "
                                    "render bound (template_limit)"),
                      "400": COMMON_ERRORS["400"], "401": COMMON_ERRORS["401"]},
        "x-example": "recs_block?user_id=testUser",
    }}
    ops["messages.preview_template"] = {"get": {
        "summary": "What the preview page shows for one user: both forms, each data call, snippets.",
        "operationId": "v1_preview_render",
        "parameters": [name_param, *any_params],
        "responses": {"200": _plain({"type": "object", "required": ["ok", "html", "text", "calls", "snippets"],
                                     "properties": {"ok": {"const": True}, "template": {"type": "string"},
                                                    "html": {"type": "string"}, "text": {"type": "string"},
                                                    "calls": {"type": "object"}, "snippets": {"type": "object"}}},
                                    "preview"),
                      "404": _error("no such template"),
                      "422": _error("the template failed, or went over a render bound (template_limit)"),
                      "400": COMMON_ERRORS["400"], "401": COMMON_ERRORS["401"], "503": PREVIEW_BUSY},
        "x-example": "hero_banner?user_id=treatment-1",
    }}
    ops["messages.preview_liquid"] = {"post": {
        "summary": "Render a Braze Liquid message; connected_content resolves against this proxy only.",
        "operationId": "v1_preview_liquid",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["liquid"],
            "properties": {"liquid": {"type": "string", "maxLength": 100000},
                           "attributes": {"type": "object"}}},
            "example": {"liquid": "Hi {{${first_name}}}", "attributes": {"user_id": "u1", "first_name": "Ada"}}}}},
        "responses": {"200": _plain({"type": "object", "required": ["ok", "output", "aborted", "abort_reason", "calls", "warnings"],
                                     "properties": {"ok": {"const": True}, "output": {"type": "string"},
                                                    "aborted": {"type": "boolean"},
                                                    "abort_reason": {"type": ["string", "null"]},
                                                    "calls": {"type": "array", "items": {"type": "object"}},
                                                    "warnings": {"type": "array", "items": LINT_WARNING}}},
                                    "the rendered message, and what would break or render empty in Braze"),
                      "400": COMMON_ERRORS["400"], "401": COMMON_ERRORS["401"],
                      "422": _error("the Liquid does not parse or render (liquid_error), or went over "
                                    "a limit and was stopped (liquid_limit, naming the limit and its value)"),
                      "503": PREVIEW_BUSY},
    }}
    accepted = {"description": "stored durably in the outbox; delivered in the background",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["ok", "id", "kind", "state", "status_url"],
                    "properties": {"ok": {"const": True}, "id": {"type": "string"}, "kind": {"type": "string"},
                                   "state": {"enum": ["queued", "delivered", "failed", "dead"], "description":
                                             "queued for a new write; a duplicate's is the earlier write's"},
                                   "status_url": {"type": "string"},
                                   "duplicate": {"type": "boolean", "description":
                                                 "true: the idempotency key named an earlier write (this is its id)"}}}}}}
    idempotency = [
        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255},
         "description": "one write per key (scoped to the credential and endpoint) for CCPROXY_IDEMPOTENCY_TTL"},
        {"name": "idempotency_key", "in": "query", "schema": {"type": "string", "maxLength": 255},
         "description": "the same, for a Connected Content URL"}]

    def json_body(example: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": {"type": "object"},
                                                                   "example": example}}}
    selector = [_parameter(p, False) for p in USER_POINT_PARAMS]
    write_errors = {"400": COMMON_ERRORS["400"], "401": COMMON_ERRORS["401"],
                    "503": _error("mediarithmics is not configured, or the outbox cannot store", True)}
    keyed_write_errors = {**write_errors,
                          "409": _error("idempotency_key_in_progress: the key's first request is "
                                        "still being stored (with Redis); retry after Retry-After", True),
                          "422": _error("idempotency_key_reused: the key named a different request")}
    ops["activities.post_activity"] = {"post": {
        "summary": "Queue a user activity (validated: $user_identifiers or a legacy id, $type, $ts).",
        "operationId": "v1_mediarithmics_activities", "requestBody": json_body(EXAMPLE_ACTIVITY),
        "parameters": idempotency,
        "responses": {"202": accepted, **keyed_write_errors}}}
    ops["choices.put_profile"] = {"put": {
        "summary": "Queue a user profile update (force_replace / merge_objects as mediarithmics documents).",
        "operationId": "v1_mediarithmics_profile_put", "requestBody": json_body({"loyalty": {"tier": "gold"}}),
        "x-example": "email_hash=abc&compartment_id=1&user_account_id=acc-1&force_replace=false&merge_objects=true",
        "parameters": [*[_parameter(p, False) for p in USER_POINT_SELECTORS],
                       _parameter("compartment_id", True), _parameter("user_account_id", True),
                       {"name": "force_replace", "in": "query", "schema": PARAM_SCHEMAS["track"]},
                       {"name": "merge_objects", "in": "query", "schema": PARAM_SCHEMAS["track"]},
                       *idempotency],
        "responses": {"202": accepted, **keyed_write_errors}}}
    ops["choices.put_choice"] = {"put": {
        "summary": "Queue a user choice (needs $choice_acceptance_value).",
        "operationId": "v1_mediarithmics_choices_put",
        "requestBody": json_body({"$choice_acceptance_value": True}),
        "x-example": "email_hash=abc&processing_id=102",
        "parameters": [*selector, _parameter("processing_id", True), *idempotency],
        "responses": {"202": accepted, **keyed_write_errors}}}
    ops["writes.write_status"] = {"get": {
        "summary": "State of a queued write: queued, delivered, failed (retrying) or dead.",
        "operationId": "v1_mediarithmics_write",
        # The id comes from the answer to a write.
        "x-example-shell": ('curl "{base}$(' + _curl("{base}/v1/mediarithmics/activities", "post",
                                                     EXAMPLE_ACTIVITY, silent=True) + ' | jq -r .status_url)"'),
        "parameters": [{"name": "write_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _plain({"type": "object", "required": ["ok", "id", "state", "attempts"],
                                     "properties": {"ok": {"const": True}, "id": {"type": "string"},
                                                    "kind": {"type": "string"},
                                                    "state": {"enum": ["queued", "delivered", "failed", "dead"]},
                                                    "attempts": {"type": "integer"},
                                                    "last_error": {"type": "string"},
                                                    "created_at": {"type": "string"},
                                                    "delivered_at": {"type": "string"}}}, "the write"),
                      "404": _error("no such write"), "401": COMMON_ERRORS["401"],
                      "503": write_errors["503"]}}}
    link_answer = _plain({"type": "object", "required": ["ok", "url"],
                          "properties": {"ok": {"const": True}, "url": {"type": "string"}}}, "a signed URL")
    ops["consent.consent_link"] = {"get": {
        "summary": "A signed one-click consent link for an email footer (expiry included in the signature).",
        "operationId": "v1_mediarithmics_consent_link", "x-example": CONSENT_LINK_EXAMPLE,
        "parameters": [*selector, _parameter("processing_id", True),
                       {"name": "accept", "in": "query", "schema": PARAM_SCHEMAS["track"]},
                       {"name": "expires", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+$"}}],
        "responses": {"200": link_answer, **write_errors}}}
    ops["pixel.pixel_link"] = {"get": {
        "summary": "A (signed, when CCPROXY_LINK_SECRET is set) email-open pixel URL.",
        "operationId": "v1_mediarithmics_pixel_link", "x-example": PIXEL_LINK_EXAMPLE,
        "parameters": [*selector, {"name": "event", "in": "query", "required": True,
                                   "schema": PARAM_SCHEMAS["user_id"]}],
        "responses": {"200": link_answer, **write_errors}}}
    ops["pixel.pixel"] = {"get": {
        "summary": "Email-open pixel: always a 1x1 GIF; queues an activity with `event` when the input is valid.",
        "operationId": "v1_mediarithmics_pixel", "security": [{}],
        # A signed pixel URL comes from pixel-link; -D - shows the answer's headers (a GIF).
        "x-example-shell": ("curl -sD - -o /dev/null \"$(curl -s '{base}/v1/mediarithmics/pixel-link?"
                            + PIXEL_LINK_EXAMPLE + "' | jq -r .url)\""),
        "parameters": [*selector, {"name": "event", "in": "query", "schema": {"type": "string"}}],
        "responses": {"200": {"description": "a 1x1 GIF", "content": {"image/gif": {"schema": {"type": "string"}}}}}}}
    consent_page = {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
    ops["consent.consent_page"] = {
        "get": {"summary": "The page a recipient sees on clicking a consent link (changes nothing).",
                "operationId": "v1_mediarithmics_consent_page", "security": [{}],
                "x-example-shell": ("curl \"$(curl -s '{base}/v1/mediarithmics/consent-link?"
                                    + CONSENT_LINK_EXAMPLE + "' | jq -r .url)\""),
                "responses": {"200": consent_page, "403": consent_page}}}
    ops["consent.consent_confirm"] = {
        "post": {"summary": "Confirm a consent link; RFC 8058 one-click compatible. Records the choice.",
                 "operationId": "v1_mediarithmics_consent_confirm", "security": [{}],
                 # What a mail client sends for RFC 8058 one-click, to a freshly made link.
                 "x-example-shell": ("curl -X POST -d 'List-Unsubscribe=One-Click' \"$(curl -s "
                                     "'{base}/v1/mediarithmics/consent-link?email_hash=one-click-1&"
                                     "processing_id=101&accept=false' | jq -r .url)\""),
                 "responses": {"200": consent_page, "403": consent_page, "503": consent_page}},
    }
    ops["messages.list_templates"] = {"get": {
        "summary": "The message template library.", "operationId": "v1_templates",
        "responses": {"200": _plain({"type": "object", "required": ["ok", "templates"],
                                     "properties": {"ok": {"const": True},
                                                    "templates": {"type": "array", "items": {"type": "object"}}}},
                                    "templates"), "401": COMMON_ERRORS["401"]},
    }}
    for summary, op in (("Alive.", "healthz"),
                        ("Upstreams' configuration, breakers, limiters; cache backend.", "readyz")):
        ops[op] = {"get": {"summary": summary, "operationId": op,
                               "responses": {"200": _plain({"type": "object", "required": ["ok"]}, summary)}}}
    ops["metrics_view"] = {"get": {"summary": "Prometheus metrics.", "operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": COMMON_ERRORS["401"]}}}
    ops["messages.preview_page"] = {"get": {"summary": "The preview page (HTML).", "operationId": "preview",
                                 "responses": {"200": {"description": "HTML",
                                                       "content": {"text/html": {"schema": {"type": "string"}}}},
                                               "401": COMMON_ERRORS["401"]}}}
    ops["openapi_view"] = {"get": {"summary": "This document.", "operationId": "openapi",
                                      "responses": {"200": _plain({"type": "object"}, "OpenAPI 3.1"),
                                                    "401": COMMON_ERRORS["401"]}}}
    return ops


def _curl(url: str, method: str, body: Any = None, silent: bool = False) -> str:
    """One curl command line; a JSON body is sent as written, in single quotes."""
    parts = ["curl"] + (["-s"] if silent else [])
    if method != "get":
        parts += ["-X", method.upper()]
    parts.append(f"'{url}'")
    if body is not None:
        data = json.dumps(body)
        assert "'" not in data, "an example body cannot hold a single quote"
        parts += ["-H", "'content-type: application/json'", "-d", f"'{data}'"]
    return " ".join(parts)


def example_command(path: str, method: str, op: dict[str, Any], base: str) -> str:
    """The shell command that runs an operation's example against `base`, as written."""
    if "x-example-shell" in op:
        return str(op["x-example-shell"]).replace("{base}", base)
    example = op.get("x-example", "")
    if "{" in path:
        url = f"{base}{path.split('{')[0]}{example}"
    else:
        url = f"{base}{path}" + (f"?{example}" if example else "")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
    return _curl(url, method, body)


def markdown_reference(doc: Mapping[str, Any], base: str = "http://localhost:8080") -> str:
    """The README's endpoint table, one runnable curl example each, from an app's document."""
    lines = ["| endpoint | summary | example |", "|---|---|---|"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            # A pipe inside a table cell must be escaped, even in code.
            curl = example_command(path, method, op, base).replace("|", "\\|")
            lines.append(f"| `{method.upper()} {path}` | {op['summary']} | `{curl}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """The document of an app built on the default settings (not the environment's: the
    published contract does not depend on a deployment), as JSON or the README's table."""
    from . import config
    from .app import create_app
    from .services import of_app

    app = create_app(config.load(environ={}))
    try:
        doc = document(app)
    finally:
        of_app(app).close()
    if "--markdown" in argv:
        sys.stdout.write(markdown_reference(doc))
    else:
        json.dump(doc, sys.stdout, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
