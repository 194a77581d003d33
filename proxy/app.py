"""The app factory: settings, services, routes and the one error handler."""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import auth, config, observability
from .cache import Timer
from .endpoints import Endpoint, load_all
from .errors import BadRequest, ProxyError
from .middleware import RequestEnvelope, log_failure
from .readiness import readiness
from .responses import cache_headers, json_response
from .services import Services

log = logging.getLogger("ccproxy")


def create_app(
    settings: config.Settings | Mapping[str, Any] | None = None, *, timer: Timer | None = None
) -> Flask:
    """Build an app; `settings` is a Settings or a mapping of overrides on env/file settings."""
    if not isinstance(settings, config.Settings):
        settings = config.load(overrides=settings)
    app = Flask(__name__, static_folder=None)  # no static files: the preview page is one HTML file
    services = Services(settings, timer)
    app.extensions["ccproxy"] = services
    observability.configure_logging(settings.log_level)
    metrics = observability.Metrics(services)
    for client in services.clients:
        client.observe = metrics.observe_upstream

    for endpoint in load_all().values():
        app.add_url_rule(
            endpoint.path, endpoint=endpoint.path, view_func=_view(endpoint, services),
            methods=["GET"],
        )

    from .messages import bp as messages_bp
    from .rendering import TemplateLibrary, default_templates_dir

    templates_dir = Path(settings.templates_dir) if settings.templates_dir else default_templates_dir()
    app.extensions["ccproxy_templates"] = TemplateLibrary(templates_dir)
    app.register_blueprint(messages_bp)
    from .consent import bp as consent_bp
    from .writes import bp as writes_bp

    app.register_blueprint(writes_bp)
    app.register_blueprint(consent_bp)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body  # write bodies; larger is a JSON 413
    services.start_delivery()
    atexit.register(services.close)

    @app.get("/metrics")
    def metrics_view():
        return Response(metrics.exposition(), mimetype="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    def openapi_view():
        from .openapi import document

        return json_response(document())

    @app.get("/healthz")
    def healthz():
        return json_response({"ok": True})

    @app.get("/readyz")
    def readyz():
        strict = request.args.get("strict", "false").lower()
        if strict not in ("true", "false", "1", "0"):
            raise BadRequest("strict must be true or false", code="invalid_parameter")
        status, answer = readiness(services, strict=strict in ("true", "1"))
        return json_response(answer, status)

    _register_error_handlers(app)
    # Metric and log labels: every fixed route; middleware.route_of names the dynamic ones.
    routes = [rule.rule for rule in app.url_map.iter_rules() if "<" not in rule.rule]
    app.wsgi_app = RequestEnvelope(  # type: ignore[method-assign]
        app.wsgi_app, metrics, auth.parse_keys(settings.api_keys), settings.request_deadline, routes,
        services, {endpoint.path: endpoint for endpoint in load_all().values()},
    )
    return app


def _view(endpoint: Endpoint, services: Services):
    def view():
        result = endpoint.handler(services, request.args)
        return json_response(result.final_body(), headers=cache_headers(result.lookup))

    view.__name__ = endpoint.path
    return view


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ProxyError)
    def proxy_error(error: ProxyError):
        log_failure(error, request.path)
        return json_response(error.body(), error.status, error.headers())

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        code = (error.name or "error").lower().replace(" ", "_")
        message = {
            404: "no such endpoint", 405: "method not allowed on this endpoint",
            413: f"the request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes "
                 "(CCPROXY_MAX_BODY)",
        }.get(error.code or 500, error.description or "error")
        if error.code == 413:
            code = "body_too_large"
        return json_response(
            {"ok": False, "error": {"code": code, "message": message}}, error.code or 500
        )

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error on %s", request.path)
        return json_response(
            {"ok": False, "error": {"code": "internal_error", "message": "the proxy failed; see its logs"}},
            500,
        )
