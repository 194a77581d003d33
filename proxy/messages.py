"""HTTP side of message templates and previews: listing, rendering, the preview page and
Braze Liquid previews. Previews never track experiment assignments and never write; they
take a slot of this process's preview pool (503 when none is free) and Liquid renders run
in its render processes, apart from the send path (preview_pool.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

from . import params
from .endpoints import call
from .errors import BadRequest, ProxyError, RenderLimitExceeded
from .guards import start_deadline
from .liquid_preview import Fetched
from .preview_pool import PreviewPool
from .render_limits import LiquidLimits
from .rendering import FORMATS, TemplateLibrary, render, template_args
from .responses import json_response
from .services import Services, of_app
from .snippets import SnippetPolicy, braze_snippets
from .writes.link_urls import base_url

bp = Blueprint("messages", __name__)
TEMPLATES = "ccproxy_templates"  # app.extensions keys: the template library,
PREVIEWS = "ccproxy_previews"  # and this process's preview pool


def _services() -> Services:
    return of_app(current_app)


def _library() -> TemplateLibrary:
    library = current_app.extensions[TEMPLATES]
    assert isinstance(library, TemplateLibrary)
    return library


def _previews() -> PreviewPool:
    """This process's preview slots and render processes (made on first use)."""
    pool = current_app.extensions.get(PREVIEWS)
    if pool is None:
        settings = _services().settings
        pool = current_app.extensions.setdefault(PREVIEWS, PreviewPool(
            settings.preview_concurrency, LiquidLimits.from_settings(settings)))
    assert isinstance(pool, PreviewPool)
    return pool


def _preview_args(args: Mapping[str, str]) -> dict[str, str]:
    """A preview's query: never tracks an experiment assignment."""
    return {**args, "track": "false"}


def _template_globals(args: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Functions templates may call. consent_link(accept) is a signed one-click link for the
    recipient in `args` (their selector and processing_id), or "" when links are not set up
    or (a subscribe link only) the choice's current version cannot be read."""
    args = dict(args or {})

    def consent_link(accept: bool) -> str:
        from .writes.consent import consent_url

        if not _services().settings.link_secret:
            return ""
        try:
            selector = params.user_point_selector(args)
            processing = args.get("processing_id") or "101"
            expires = int(time.time() + _services().settings.link_ttl_days * 86400)
            return consent_url(selector, processing, bool(accept), expires, base_url())
        except ProxyError:
            return ""

    return {"consent_link": consent_link}



@bp.get("/v1/templates")
def list_templates() -> Response:
    return json_response({"ok": True, "templates": [t.listing() for t in _library().templates.values()]})


@bp.get("/v1/render/<name>")
def render_template(name: str) -> Response:
    fmt = request.args.get("format", "html")
    if fmt not in FORMATS:
        raise BadRequest("format must be html or text", code="invalid_parameter")
    rendered = render(_library(), _services(), name, request.args, [fmt], _template_globals(request.args))
    mimetype = "text/html" if fmt == "html" else "text/plain"
    response = Response(rendered.output[fmt], mimetype=mimetype)
    response.headers["X-Cache"] = rendered.cache
    response.headers["Cache-Control"] = f"max-age={int(rendered.max_age)}"
    return response


@bp.get("/v1/preview/render/<name>")
def preview_template(name: str) -> Response:
    """Everything the preview page shows for one user: both forms, each data call, snippets."""
    library = _library()
    template = library.get(name)
    args = _preview_args(request.args)
    with _previews().slot():
        rendered = render(library, _services(), name, args, template.formats,
                          _template_globals(template_args(template, args)))
    return json_response({
        "ok": True,
        "template": name,
        "html": rendered.output.get("html", ""),
        "text": rendered.output.get("text", ""),
        "calls": {data: c.report() for data, c in rendered.calls.items()},
        "snippets": braze_snippets(template, template_args(template, request.args), base_url(),
                                   snippet_policy()),
    })


def snippet_policy() -> SnippetPolicy:
    services = _services()
    settings = services.settings
    return SnippetPolicy(settings.email_hash_liquid,
                         settings.braze_credential if settings.api_keys else None,
                         services.endpoints.fresh_seconds(settings))


@bp.post("/v1/preview/liquid")
def preview_liquid() -> Response:
    payload = params.json_body(request)
    if not isinstance(payload, dict) or not isinstance(payload.get("liquid"), str):
        raise BadRequest('send JSON {"liquid": "<message>", "attributes": {...}}', code="invalid_body")
    attributes = payload.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise BadRequest("attributes must be an object", code="invalid_body")
    if len(payload["liquid"]) > 100_000:
        raise BadRequest("the message is longer than 100000 characters", code="invalid_body")
    services, library = _services(), _library()
    own_hosts = {request.host}
    if services.settings.public_url:
        own_hosts.add(urlsplit(services.settings.public_url).netloc)

    clock_started, calls = False, 0

    def resolve(path: str, args: dict[str, str]) -> Fetched:
        # The data calls share one deadline from the first of them, not from the request's
        # start: a render process that had to be started first must not eat their budget.
        # (The envelope restores the request's own deadline when it ends.)
        nonlocal clock_started, calls
        calls += 1
        if calls > services.settings.preview_max_calls:
            # A loop of calls would spend the upstream budgets recipients need (3,000 calls
            # in one preview took Amplitude's minute): the preview stops, nothing is called.
            raise RenderLimitExceeded(
                f"connected_content_limit: the message makes more than {services.settings.preview_max_calls} "
                "Connected Content calls (CCPROXY_PREVIEW_MAX_CALLS)")
        if not clock_started:
            start_deadline(services.settings.request_deadline)
            clock_started = True
        return _resolve(path, _preview_args(args))

    def _resolve(path: str, args: dict[str, str]) -> Fetched:
        try:
            if path in services.endpoints:
                done = call(services, path, args)
                return Fetched(done.status, done.body, done.cache)
            if path.startswith("/v1/render/"):
                name = path.removeprefix("/v1/render/")
                fmt = args.get("format", "html") if args.get("format") in FORMATS else "html"
                rendered = render(library, services, name, args, [fmt], _template_globals(args))
                return Fetched(200, rendered.output[fmt], rendered.cache)
        except ProxyError as error:
            return Fetched(error.status, error.body())
        # Braze renders a 404 as an empty string.
        return Fetched(404, "")

    # Syntax errors are a 422 liquid_error, limits a 422 liquid_limit (render_limits.py); the
    # render process also lints the message (`warnings`).
    return json_response(_previews().render_liquid(payload["liquid"], attributes, resolve, own_hosts,
                                                   library.directory / "content_blocks"))


@bp.get("/preview")
def preview_page() -> Response:
    html = resources.files("proxy.web").joinpath("preview.html").read_text(encoding="utf-8")
    return Response(html, mimetype="text/html")
