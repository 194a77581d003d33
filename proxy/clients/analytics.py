"""Client of the Amplitude HTTP V2 API (`POST /2/httpapi`): batches of events.

The `amplitude-analytics` SDK builds, batches and retries the events (`proxy/exposures.py`);
this client is its transport in place of the SDK's urllib one, which reads `HTTP_PROXY` and
friends from the environment: here, as for every upstream, the only egress proxy is
`CCPROXY_UPSTREAM_PROXY`, and the call has a deadline, a breaker and metrics.
"""

from __future__ import annotations

from typing import Any

import urllib3

from ..config import credential_id
from .base import HttpClient

# Answers the SDK acts on event by event (invalid fields, too large, throttled): results, not
# failures. 5xx, timeouts and refusals raise, and the SDK retries the batch.
SDK_STATUSES = (200, 400, 413, 429)


class AnalyticsClient(HttpClient):
    name = "amplitude-events"
    path = "/2/httpapi"

    def __init__(self, pool: urllib3.PoolManager, base_url: str, api_key: str, **http: Any):
        super().__init__(pool, base_url, **http)
        self.credential = credential_id(api_key)
        self.required = (("CCPROXY_AMPLITUDE_API_KEY", api_key),)

    def post_events(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Send one batch (`{"api_key", "events", "options"}`); answer the status and the JSON
        body (`code`, `error`, `events_with_invalid_fields`, `throttled_events`...)."""
        status, body = self.request("POST", self.path, json_body=payload, ok_statuses=SDK_STATUSES)
        return status, body if isinstance(body, dict) else {}
