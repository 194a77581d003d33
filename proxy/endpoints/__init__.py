"""The public data endpoints: a registry of (path, handler), the only router for them, that
the WSGI fast path, previews, templates and docs share.

A handler takes a `Context` (the services and its own registration) and the query
arguments and returns a `Result`; it never sees Flask, so the render layer can call the same
handlers. It asks its upstream through `Context.fetch(query)`, where the registration decides
the cache TTL and the operator fallback content (by the endpoint's path), and the client
(`query.client.fallback`) shapes that content as its upstream would answer.
proxy/dispatch.py turns the outcome into HTTP, the same way for every caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import dispatch
from ..cache import Lookup
from ..clients.base import Query
from ..config import Settings
from ..dispatch import Call

if TYPE_CHECKING:
    from ..services import Services

__all__ = ["Call", "Context", "Endpoint", "REGISTRY", "Result", "call", "endpoint", "load_all"]


@dataclass(frozen=True, slots=True)
class Result:
    body: Mapping[str, Any]  # one of the answer TypedDicts
    lookup: Lookup | None = None

    def final_body(self) -> dict[str, Any]:
        """The answer with its provenance: `stale` (older than its TTL, served because the
        upstream is slow or failing) and `fallback` (operator default content)."""
        state = self.lookup.state if self.lookup else ""
        return {**self.body, "stale": state == "STALE", "fallback": state == "FALLBACK"}


Handler = Callable[["Context", Mapping[str, str]], Result]


def _no_ttl(settings: Settings) -> float:
    return 0.0


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: Handler
    summary: str
    params: tuple[str, ...] = field(default=())
    required: tuple[str, ...] = field(default=())
    answer: Any = None  # the TypedDict of the flat answer: the template contract
    example: str = ""  # a query string that answers from the sandboxes
    # The cache kind: the CCPROXY_CACHE_TTL_<KIND> setting that keeps the answer fresh.
    ttl: Callable[[Settings], float] = _no_ttl

    def run(self, services: Services, args: Mapping[str, str]) -> Result:
        return self.handler(Context(services, self), args)


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler works with: the app's services, and its own registration, whose cache
    TTL and fallback content govern each fetch."""

    services: Services
    endpoint: Endpoint

    @property
    def ttl(self) -> float:
        return self.endpoint.ttl(self.services.settings)

    def fetch(self, query: Query, *, when_limited: bool = False) -> Lookup:
        """One upstream read through the cache; the operator's fallback content for this
        endpoint stands in when it fails and nothing stale is left (and, `when_limited`, the
        client's empty answer when the upstream is rate limited)."""
        return self.services.cached(query, self.ttl, self.services.fallback_content(self.endpoint.path),
                                    when_limited)


REGISTRY: dict[str, Endpoint] = {}


def endpoint(
    path: str,
    summary: str,
    params: tuple[str, ...] = (),
    *,
    required: tuple[str, ...] = (),
    answer: Any = None,
    example: str = "",
    ttl: Callable[[Settings], float] = _no_ttl,
) -> Callable[[Handler], Handler]:
    """Register a handler under its public path (a contract: never rename); `ttl` reads the
    setting of its cache kind (`lambda s: s.cache_ttl_<kind>`). The OpenAPI document is
    generated from these registrations, so it cannot drift from them."""

    def register(handler: Handler) -> Handler:
        REGISTRY[path] = Endpoint(path, handler, summary, params, required, answer, example, ttl)
        return handler

    return register


def load_all() -> dict[str, Endpoint]:
    """Import every endpoint module so the registry is complete."""
    from . import amplitude, experiment, mediarithmics, target  # noqa: F401

    return REGISTRY


def fresh_seconds(settings: Settings) -> Callable[[str], float]:
    """Seconds the answers of the data endpoint at a path stay fresh."""
    return lambda path: REGISTRY[path].ttl(settings)


def call(services: Services, path: str, args: Mapping[str, str]) -> Call:
    """Run the data endpoint registered at `path` without HTTP (dispatch.call): its answer
    is the one HTTP would give; a bad request is raised, an upstream failure returned."""
    return dispatch.call(REGISTRY[path], services, args)
