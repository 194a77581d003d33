"""Amplitude Experiment endpoint: variants (and payloads) for one user."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import params
from ..cache import Lookup
from ..clients.base import Answer
from ..errors import BadRequest
from ..shape import experiment as shape
from . import Context, Result, endpoint

if TYPE_CHECKING:
    from ..experiment_local import Configuration

PROPERTY_PREFIX = "user_properties."


def evaluation_context(args: Mapping[str, str]) -> dict[str, Any]:
    """`context` JSON merged with `user_properties.<name>=<value>` parameters."""
    context = params.json_object(args, "context")
    extra = {name: params.scalar(value) for name, value in params.prefixed(args, PROPERTY_PREFIX).items()}
    if extra:
        existing = context.get("user_properties") or {}
        if not isinstance(existing, dict):
            raise BadRequest("context.user_properties must be an object", code="invalid_json")
        context["user_properties"] = {**existing, **extra}
    return context


@endpoint(
    "/v1/experiment/variants",
    "Experiment variants and payloads for one user; requested flags without a variant read `off`.",
    ("user_id", "device_id", "flag_keys", "context", "track"),
    answer=shape.VariantsAnswer,
    example="user_id=treatment-1&flag_keys=checkout-button,hero-banner&track=false",
    ttl=lambda s: s.cache_ttl_variants,
)
def variants(ctx: Context, args: Mapping[str, str]) -> Result:
    user_id, device_id = params.user_ref(args)
    flags = params.id_list(args, "flag_keys")
    context = evaluation_context(args)
    track = params.boolean(args, "track", True)
    store = ctx.services.flag_store
    config = store.current() if store is not None else None
    if config is not None:
        return local_variants(ctx, config, user_id, device_id, flags, context, track)
    lookup = ctx.fetch(ctx.services.experiment.variants(user_id, device_id, flags, context, track))
    return Result.shaped(lookup, shape.variants, flags, user_id, device_id, track)


def local_variants(ctx: Context, config: Configuration, user_id: str, device_id: str,
                   flags: list[str], context: dict[str, Any], track: bool) -> Result:
    """Local mode: the flags the configuration can decide, evaluated in process; the others in
    one remote call with no-track (Amplitude sends no assignment event either way). With
    `track` and an analytics key, one exposure event per answered flag (`tracked: true`)."""
    from ..experiment_local import evaluate
    from ..experiment_local import evaluation_context as engine_context

    decision = evaluate(config, engine_context(user_id, device_id, context), flags)
    vardata = dict(decision.vardata)
    lookup = Lookup(Answer(vardata), "LOCAL", 0.0, ctx.ttl)
    if decision.remote:
        remote_query = ctx.services.experiment.variants(user_id, device_id, decision.remote, context, False)
        lookup = ctx.fetch(remote_query)
        remote = lookup.value.data if isinstance(lookup.value.data, dict) else {}
        vardata.update({k: v for k, v in remote.items() if k in decision.remote})
    tracker = ctx.services.exposures if track else None
    if tracker is not None:
        # The operator's fallback defaults are no exposure; what the engine decided is.
        seen = decision.vardata if lookup.state == "FALLBACK" else vardata
        tracker.track(exposures(user_id, device_id, seen, decision.variants))
    return Result(shape.variants(vardata, flags, user_id, device_id, tracker is not None), lookup)


def exposures(user_id: str, device_id: str, vardata: dict, engine: dict) -> list:
    """One exposure per assigned flag: the engine's variant (value, metadata) where local
    evaluation decided it, the `/v1/vardata` answer's fields otherwise."""
    from ..exposures import Exposure

    now = time.time()
    found = []
    for flag, answer in vardata.items():
        if not isinstance(answer, dict) or answer.get("key") in (None, ""):
            continue
        source = engine.get(flag)
        value = source.value if source is not None else answer.get("value")
        metadata = source.metadata if source is not None else answer.get("metadata")
        found.append(Exposure(user_id, device_id, flag, str(answer["key"]), value, answer.get("payload"),
                              metadata if isinstance(metadata, dict) else None, now))
    return found

