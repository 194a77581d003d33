"""Client of the Amplitude Experiment Evaluation API (`GET /v1/vardata`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import credential_id
from ..errors import UpstreamBadAnswer
from .base import Answer, HttpClient


class ExperimentClient(HttpClient):
    name = "experiment"
    path = "/v1/vardata"

    def __init__(self, pool, base_url: str, deployment_key: str, **http):
        super().__init__(pool, base_url, **http)
        self._headers = {"Authorization": f"Api-Key {deployment_key}"}
        self.credential = credential_id(deployment_key)
        self.required = (("CCPROXY_EXPERIMENT_DEPLOYMENT_KEY", deployment_key),)

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
