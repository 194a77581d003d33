"""The public endpoints: a registry of (path, handler) that routes, previews and docs share.

A handler takes the services and the query arguments and returns a `Result`;
it never sees Flask, so the render layer can call the same handlers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..cache import Lookup


@dataclass(frozen=True, slots=True)
class Result:
    body: dict[str, Any]
    lookup: Lookup | None = None


Handler = Callable[[Any, Mapping[str, str]], Result]


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Handler
    summary: str
    params: tuple[str, ...] = field(default=())


REGISTRY: dict[str, Endpoint] = {}


def endpoint(path: str, summary: str, params: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    """Register a handler under its public path (a contract: never rename)."""

    def register(handler: Handler) -> Handler:
        REGISTRY[path] = Endpoint(path, handler, summary, params)
        return handler

    return register


def load_all() -> dict[str, Endpoint]:
    """Import every endpoint module so the registry is complete."""
    from . import amplitude, experiment, mediarithmics, target  # noqa: F401

    return REGISTRY
