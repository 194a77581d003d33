"""The public endpoints: a registry of (path, handler) that routes, previews and docs share.

A handler takes the services and the query arguments and returns a `Result`;
it never sees Flask, so the render layer can call the same handlers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cache import Lookup


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


@dataclass(frozen=True, slots=True)
class Call:
    """One in-process endpoint call, as previews and the render layer report it."""

    path: str
    status: int
    body: dict[str, Any]
    cache: str  # HIT, MISS, COALESCED, or "-" when the call failed before the cache
    ms: float
    max_age: float | None = None

    def report(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "cache": self.cache,
                "ms": round(self.ms, 2), "body": self.body}


def call(services: Any, path: str, args: Mapping[str, str]) -> Call:
    """Run a registered endpoint without HTTP; errors become their JSON answer and status.

    A bad request is raised (the caller's input is wrong); an upstream failure is
    returned, so a template can show its fallback instead of failing the message.
    """
    from ..errors import BadRequest, ProxyError

    started = time.perf_counter()
    try:
        result = REGISTRY[path].handler(services, args)
    except BadRequest:
        raise
    except ProxyError as error:
        return Call(path, error.status, error.body(), "-", (time.perf_counter() - started) * 1000)
    ms = (time.perf_counter() - started) * 1000
    lookup = result.lookup
    return Call(path, 200, result.final_body(), lookup.state if lookup else "-", ms,
                lookup.max_age if lookup else None)
