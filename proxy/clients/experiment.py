"""Client of the Amplitude Experiment Evaluation API (`GET /v1/vardata`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3

from ..config import credential_id
from ..errors import UpstreamBadAnswer
from .base import Answer, HttpClient, Query


class ExperimentClient(HttpClient):
    name = "experiment"
    path = "/v1/vardata"

    def __init__(self, pool: urllib3.PoolManager, base_url: str, deployment_key: str, **http: Any):
        super().__init__(pool, base_url, **http)
        self._headers = {"Authorization": f"Api-Key {deployment_key}"}
        self.credential = credential_id(deployment_key)
        self.required = (("CCPROXY_EXPERIMENT_DEPLOYMENT_KEY", deployment_key),)

    def variants(self, user_id: str, device_id: str, flags: Sequence[str],
                 context: Mapping[str, Any], track: bool) -> Query:
        """The user's variants for `flags` (all flags when empty) in an evaluation `context`;
        `track=False` evaluates without an assignment event."""
        params = {k: v for k, v in (("user_id", user_id), ("device_id", device_id)) if v}
        if flags:
            params["flag_keys"] = ",".join(sorted(flags))
        if context:
            # Canonical JSON so equal contexts share one cache entry.
            params["context"] = json.dumps(context, sort_keys=True, separators=(",", ":"))
        # Tracked and untracked evaluations are different calls: never one cache entry.
        operation = "vardata" if track else "vardata-no-track"
        return Query(self, operation, params, lambda: self.vardata(params, track))

    def fallback(self, query: Query, content: Mapping[str, Any]) -> Any:
        """Operator defaults `variants = {flag = "variant"}`, `payloads = {flag = {...}}` as a
        vardata answer."""
        payloads = content.get("payloads", {})
        return {
            flag: {"key": str(key), **({"payload": payloads[flag]} if flag in payloads else {})}
            for flag, key in content.get("variants", {}).items()
        }

    def vardata(self, params: Mapping[str, str], track: bool) -> Answer:
        """Variants keyed by flag key; `track=False` evaluates without an assignment event."""
        headers = dict(self._headers)
        if not track:
            headers["X-Amp-Exp-Track"] = "no-track"
        _status, body = self.request("GET", self.path, params=params, headers=headers)
        if not isinstance(body, dict):
            raise UpstreamBadAnswer(self.name, "experiment answered with something not an object")
        return Answer(body)


class FlagConfigClient(ExperimentClient):
    """Client of the Flags API (`GET /sdk/v2/flags?v=0`, same deployment key, its own host):
    the deployment's flag configurations for local evaluation, as raw JSON objects (parsed by
    `proxy/experiment_local.py`)."""

    name = "experiment-flags"
    path = "/sdk/v2/flags"

    def flags(self) -> list[dict]:
        _status, body = self.request("GET", self.path, params={"v": "0"}, headers=self._headers)
        if not isinstance(body, list):
            raise UpstreamBadAnswer(self.name, "the Flags API answered with something not a list")
        return [flag for flag in body if isinstance(flag, dict)]
