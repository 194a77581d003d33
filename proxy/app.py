"""The app factory: settings, services, routes and error handlers. Building an app has no
side effects: background delivery starts where the app is served (serving.py) or when a
caller asks (`Services.start_delivery`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

from . import auth, config, observability
from .cache import Timer
from .dispatch import http_answer, log_failure
from .endpoints import Registry
from .errors import BadRequest, BodyTooLarge, InternalError, MethodNotAllowed, NotFound, ProxyError
from .middleware import RequestEnvelope
from .readiness import readiness
from .responses import JSON_TYPE, json_bytes, json_response
from .services import EXTENSION, Services

log = logging.getLogger("ccproxy")


def create_app(
    settings: config.Settings | Mapping[str, Any] | None = None, *, timer: Timer | None = None,
    endpoints: Registry | None = None,
) -> Flask:
    """Build an app; `settings` is a Settings or a mapping of overrides on env/file settings;
    `endpoints` its data endpoints (by default a new registry of every public one)."""
    if not isinstance(settings, config.Settings):
        settings = config.load(overrides=settings)
    app = Flask(__name__, static_folder=None)  # no static files: the preview page is one HTML file
    metrics = observability.Metrics()
    services = Services.build(settings, timer, observe=metrics.observe_upstream, endpoints=endpoints)
    metrics.watch(services)
    app.extensions[EXTENSION] = services
    observability.configure_logging(settings.log_level)

    # The data endpoints have no Flask views: the app's registry routes them (middleware.py).
    endpoints = services.endpoints
    from .messages import TEMPLATES
    from .messages import bp as messages_bp
    from .rendering import TemplateLibrary, default_templates_dir

    templates_dir = Path(settings.templates_dir) if settings.templates_dir else default_templates_dir()
    app.extensions[TEMPLATES] = TemplateLibrary(templates_dir)
    app.register_blueprint(messages_bp)
    from .writes import blueprints as write_blueprints

    for blueprint in write_blueprints():
        app.register_blueprint(blueprint)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body  # write bodies; larger is a JSON 413

    @app.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.exposition(), mimetype="text/plain; version=0.0.4")

    openapi_body: list[bytes] = []  # built on first ask: 3-10 ms a build, the same every time

    @app.get("/openapi.json")
    def openapi_view() -> Response:
        if not openapi_body:
            from .openapi import document

            openapi_body.append(json_bytes(document(app)))
        return Response(openapi_body[0], mimetype=JSON_TYPE)

    @app.get("/healthz")
    @auth.open_to_all  # load balancers probe without credentials
    def healthz() -> Response:
        return json_response({"ok": True})

    @app.get("/readyz")
    @auth.open_to_all
    def readyz() -> Response:
        strict = request.args.get("strict", "false").lower()
        if strict not in ("true", "false", "1", "0"):
            raise BadRequest("strict must be true or false", code="invalid_parameter")
        status, answer = readiness(services, strict=strict in ("true", "1"))
        return json_response(answer, status)

    _register_error_handlers(app)
    # From the URL map and the registry: metric and log labels (each fixed route and data
    # endpoint; a route with variables by the path before them) and the open paths.
    rules = list(app.url_map.iter_rules())
    shared = {path: {m for rule in rules if rule.rule == path for m in rule.methods or ()}
              for path in endpoints}  # the writes on a data endpoint's path (PUT, POST)
    app.wsgi_app = RequestEnvelope(  # type: ignore[method-assign]
        app.wsgi_app, metrics, auth.parse_keys(settings.api_keys), settings.request_deadline,
        [*(rule.rule for rule in rules if not rule.arguments), *endpoints], services, endpoints, shared,
        prefixes={rule.rule.split("<", 1)[0]: route_label(rule) for rule in rules if rule.arguments},
        open_paths={rule.rule for rule in rules if getattr(app.view_functions[rule.endpoint], auth.OPEN, False)},
    )
    return app


# Metric labels dashboards already count on, where they differ from the route.
ROUTE_LABELS = {"/v1/mediarithmics/writes/<write_id>": "/v1/mediarithmics/writes/<id>"}


def route_label(rule: Rule) -> str:
    """The metrics and access-log label of a route with variables (`/v1/render/<name>`)."""
    return ROUTE_LABELS.get(rule.rule, rule.rule)


def _register_error_handlers(app: Flask) -> None:
    """Every error of the Flask routes answers through dispatch.http_answer, as the data
    endpoints' errors do."""

    def answer(error: ProxyError) -> Response:
        status, headers, body = http_answer(error)
        return json_response(body, status, headers)

    @app.errorhandler(ProxyError)
    def proxy_error(error: ProxyError) -> Response:
        log_failure(error, request.path)
        return answer(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 404:
            return answer(NotFound("no such endpoint"))
        if status == 405:
            return answer(MethodNotAllowed(getattr(error, "valid_methods", None) or ()))
        if status == 413:
            return answer(BodyTooLarge(app.config["MAX_CONTENT_LENGTH"]))
        refused = ProxyError(error.description or "error",
                             code=(error.name or "error").lower().replace(" ", "_"))
        refused.status = status
        return answer(refused)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unexpected error on %s", request.path)
        return answer(InternalError())
