"""The public data endpoints: each app's `Registry` of (path, handler), the only router for
them, that the WSGI fast path, previews, templates and docs share.

`@endpoint` makes a handler into an `Endpoint` and registers it nowhere: importing an
endpoint module changes no global state. `build_registry` collects the `Endpoint`s each
endpoint module defines; `create_app` builds one for its app (on its `Services`), so two
apps in one process never share or leak registrations.

A handler takes a `Context` (the services and its own registration) and the query
arguments and returns a `Result`; it never sees Flask, so the render layer can call the same
handlers. It asks its upstream through `Context.fetch(query)`, where the registration decides
the cache TTL and the operator fallback content (by the endpoint's path), and the client
(`query.client.fallback`) shapes that content as its upstream would answer.
proxy/dispatch.py turns the outcome into HTTP, the same way for every caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import dispatch
from ..cache import Lookup
from ..clients.base import Query
from ..config import Settings
from ..dispatch import Call
from ..responses import json_bytes

if TYPE_CHECKING:
    from ..services import Services

__all__ = ["Call", "Context", "Endpoint", "Registry", "Result", "build_registry", "call", "endpoint"]


# Byte forms kept per cached answer: HTML, text and AMP renders of one message ask the same
# URL, so one is the rule; the bounds keep an answer asked in many shapes (or one very
# large answer) from growing an entry by more than ENCODED_BYTES_PER_ANSWER.
ENCODED_PER_ANSWER = 4
ENCODED_BYTES_PER_ANSWER = 16 * 1024


class Result:
    """A handler's answer: the shaped body and the lookup it came from.

    `Result.shaped(lookup, shaper, *args)` is the form for a body that a pure shaper makes
    from a cached upstream answer: its JSON bytes are kept on that answer (`Answer.encoded`),
    so the same question asked again while the entry lives is neither shaped nor encoded
    again. They expire with the entry itself: there is no second cache to keep in step.
    The first answer is shaped at once, inside the handler, so a shaper that fails is the
    handler's failure as before (dispatch.run); later ones shape only if `body` is read.
    """

    __slots__ = ("lookup", "_body", "_shaper", "_args", "_key", "_payload")

    def __init__(self, body: Mapping[str, Any] | None, lookup: Lookup | None = None):
        self.lookup = lookup
        self._body = body  # one of the answer TypedDicts
        self._shaper: Callable[..., Mapping[str, Any]] | None = None
        self._args: tuple[Any, ...] = ()
        self._key: tuple[Any, ...] | None = None
        self._payload: bytes | None = None

    @classmethod
    def shaped(cls, lookup: Lookup, shaper: Callable[..., Mapping[str, Any]], *args: Any) -> Result:
        """`shaper(lookup.value.data, *args)`, shaped and encoded once per cached answer."""
        result = cls(None, lookup)
        result._shaper, result._args = shaper, args
        # What the bytes depend on besides the data: the shaper, its arguments (lists as
        # tuples) and the provenance flags.
        key = (shaper, tuple(tuple(arg) if isinstance(arg, list) else arg for arg in args),
               lookup.state == "STALE", lookup.state == "FALLBACK")
        try:
            result._payload = lookup.value.encoded.get(key)
            result._key = key
        except TypeError:  # an argument that cannot be a key: shaped and encoded each time
            pass
        if result._payload is None:
            result._body = shaper(lookup.value.data, *args)
        return result

    @property
    def body(self) -> Mapping[str, Any]:
        if self._body is None:
            assert self._shaper is not None and self.lookup is not None
            self._body = self._shaper(self.lookup.value.data, *self._args)  # pure: as when encoded
        return self._body

    def final_body(self) -> dict[str, Any]:
        """The answer with its provenance: `stale` (older than its TTL, served because the
        upstream is slow or failing) and `fallback` (operator default content)."""
        state = self.lookup.state if self.lookup else ""
        return {**self.body, "stale": state == "STALE", "fallback": state == "FALLBACK"}

    def payload(self) -> bytes:
        """`final_body()` as the JSON bytes sent (raises TypeError or ValueError when it is
        not JSON, as responses.json_bytes does)."""
        if self._payload is None:
            self._payload = json_bytes(self.final_body())
            if self._key is not None and self.lookup is not None:
                encoded = self.lookup.value.encoded
                if len(encoded) < ENCODED_PER_ANSWER and len(self._payload) + sum(
                        map(len, encoded.values())) <= ENCODED_BYTES_PER_ANSWER:
                    encoded[self._key] = self._payload
        return self._payload


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


def endpoint(
    path: str,
    summary: str,
    params: tuple[str, ...] = (),
    *,
    required: tuple[str, ...] = (),
    answer: Any = None,
    example: str = "",
    ttl: Callable[[Settings], float] = _no_ttl,
) -> Callable[[Handler], Endpoint]:
    """The registration of a handler under its public path (a contract: never rename); `ttl`
    reads the setting of its cache kind (`lambda s: s.cache_ttl_<kind>`). The OpenAPI
    document is generated from the registrations, so it cannot drift from them."""

    def register(handler: Handler) -> Endpoint:
        return Endpoint(path, handler, summary, params, required, answer, example, ttl)

    return register


class Registry(Mapping[str, Endpoint]):
    """One app's data endpoints by path, in registration order (the OpenAPI document's
    order). Read-only once built: what an app routes cannot change under it."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._by_path: dict[str, Endpoint] = {}
        for registered in endpoints:
            if registered.path in self._by_path:
                raise ValueError(f"two endpoints registered at {registered.path}")
            self._by_path[registered.path] = registered

    def __getitem__(self, path: str) -> Endpoint:
        return self._by_path[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_path)

    def __len__(self) -> int:
        return len(self._by_path)

    def fresh_seconds(self, settings: Settings) -> Callable[[str], float | None]:
        """Seconds the answers of the data endpoint at a path stay fresh (None: no data
        endpoint there)."""

        def ttl(path: str) -> float | None:
            registered = self._by_path.get(path)
            return None if registered is None else registered.ttl(settings)

        return ttl


def registrations(module: ModuleType) -> list[Endpoint]:
    """The endpoints a module defines (not those it imports), in definition order."""
    return [value for value in vars(module).values()
            if isinstance(value, Endpoint) and value.handler.__module__ == module.__name__]


def endpoint_modules() -> tuple[ModuleType, ...]:
    from . import amplitude, experiment, mediarithmics, target

    return amplitude, experiment, mediarithmics, target


def build_registry(extra: Iterable[Endpoint] = ()) -> Registry:
    """A new registry of every public data endpoint (and `extra` ones)."""
    return Registry([*(e for module in endpoint_modules() for e in registrations(module)), *extra])


def call(services: Services, path: str, args: Mapping[str, str]) -> Call:
    """Run the data endpoint the services' app registered at `path` without HTTP
    (dispatch.call): its answer is the one HTTP would give; a bad request is raised, an
    upstream failure returned."""
    return dispatch.call(services.endpoints[path], services, args)
