"""The public data endpoints: a registry of (path, handler), the only router for them, that
the WSGI fast path, previews, templates and docs share.

A handler takes the services and the query arguments and returns a `Result`;
it never sees Flask, so the render layer can call the same handlers. proxy/dispatch.py turns
its outcome into HTTP, the same way for every caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import dispatch
from ..cache import Lookup
from ..dispatch import Call

__all__ = ["Call", "Endpoint", "REGISTRY", "Result", "call", "endpoint", "load_all"]


@dataclass(frozen=True, slots=True)
class Result:
    body: Mapping[str, Any]  # one of the answer TypedDicts
    lookup: Lookup | None = None

    def final_body(self) -> dict[str, Any]:
        """The answer with its provenance: `stale` (older than its TTL, served because the
        upstream is slow or failing) and `fallback` (operator default content)."""
        state = self.lookup.state if self.lookup else ""
        return {**self.body, "stale": state == "STALE", "fallback": state == "FALLBACK"}


Handler = Callable[[Any, Mapping[str, str]], Result]


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Handler
    summary: str
    params: tuple[str, ...] = field(default=())
    required: tuple[str, ...] = field(default=())
    answer: Any = None  # the TypedDict of the flat answer: the template contract
    example: str = ""  # a query string that answers from the sandboxes
    kind: str = ""  # the cache kind whose TTL governs the answer (Settings.ttl)


REGISTRY: dict[str, Endpoint] = {}


def endpoint(
    path: str,
    summary: str,
    params: tuple[str, ...] = (),
    *,
    required: tuple[str, ...] = (),
    answer: Any = None,
    example: str = "",
    kind: str = "",
) -> Callable[[Handler], Handler]:
    """Register a handler under its public path (a contract: never rename). The OpenAPI
    document is generated from these registrations, so it cannot drift from them."""

    def register(handler: Handler) -> Handler:
        REGISTRY[path] = Endpoint(path, handler, summary, params, required, answer, example, kind)
        return handler

    return register


def load_all() -> dict[str, Endpoint]:
    """Import every endpoint module so the registry is complete."""
    from . import amplitude, experiment, mediarithmics, target  # noqa: F401

    return REGISTRY


def call(services: Any, path: str, args: Mapping[str, str]) -> Call:
    """Run the data endpoint registered at `path` without HTTP (dispatch.call): its answer
    is the one HTTP would give; a bad request is raised, an upstream failure returned."""
    return dispatch.call(REGISTRY[path], services, args)
