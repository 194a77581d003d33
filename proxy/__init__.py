"""connected-content-proxy: flat, Liquid-friendly JSON for Braze Connected Content."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

__version__ = "0.1.0"


def create_app(settings: Any = None, **kwargs: Any) -> Flask:
    """Build the Flask app (see `proxy.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(settings, **kwargs)


__all__ = ["create_app", "__version__"]
