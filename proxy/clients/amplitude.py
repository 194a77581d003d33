"""Client of the Amplitude User Profile API (`GET /v1/userprofile`): one user's
recommendations, properties, computations and cohorts, each asked with its own query flags
(Amplitude's docs: `get_recs`, `get_amp_props`, `get_computations`, `comp_id`,
`get_cohort_ids`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import urllib3

from ..config import credential_id
from ..errors import UpstreamBadAnswer
from .base import Answer, HttpClient, Query

NOT_SEEN = "not seen before"
OPERATION = "userprofile"


class AmplitudeClient(HttpClient):
    """Asks for one user's profile; `not seen before` becomes a missing Answer."""

    name = "amplitude"
    path = "/v1/userprofile"

    def __init__(self, pool: urllib3.PoolManager, base_url: str, secret_key: str, **http: Any):
        super().__init__(pool, base_url, **http)
        # Amplitude's documented header form; the key itself never leaves this object.
        self._headers = {"Authorization": f"Api-Key {secret_key}"}
        self.required = (("CCPROXY_AMPLITUDE_SECRET_KEY", secret_key),)
        self.credential = credential_id(secret_key)

    def recommendations(self, user_id: str, device_id: str, rec_ids: Sequence[str],
                        rec_type: str | None = None) -> Query:
        """The user's recommendations for each rec id (`rec_type`: model or random)."""
        return self._query(user_id, device_id, _rec_flags(rec_ids, rec_type))

    def properties(self, user_id: str, device_id: str) -> Query:
        return self._query(user_id, device_id, {"get_amp_props": "true"})

    def computations(self, user_id: str, device_id: str, comp_id: str | None = None) -> Query:
        """One computation (`comp_id`), else all of them."""
        return self._query(user_id, device_id,
                           {"comp_id": comp_id} if comp_id else {"get_computations": "true"})

    def cohorts(self, user_id: str, device_id: str) -> Query:
        return self._query(user_id, device_id, {"get_cohort_ids": "true"})

    def profile(self, user_id: str, device_id: str, rec_ids: Sequence[str] = (),
                rec_type: str | None = None) -> Query:
        """Properties, computations and cohorts (and recommendations) in one call."""
        flags = {"get_amp_props": "true", "get_cohort_ids": "true", "get_computations": "true"}
        if rec_ids:
            flags.update(_rec_flags(rec_ids, rec_type))
        return self._query(user_id, device_id, flags)

    def _query(self, user_id: str, device_id: str, flags: dict[str, str]) -> Query:
        params = {k: v for k, v in (("user_id", user_id), ("device_id", device_id)) if v}
        params.update(flags)
        return Query(self, OPERATION, params, lambda: self.userprofile(params))

    def fallback(self, query: Query, content: Mapping[str, Any]) -> Any:
        """The operator's content as a `userData` answer: `items` (for every rec id asked),
        `properties`, `computations`, `cohort_ids`."""
        rec_ids = [r for r in query.params.get("rec_id", "").split(",") if r]
        recs = [
            {"rec_id": r, "child_rec_id": r, "items": list(content.get("items", [])),
             "is_control": False, "recommendation_source": "fallback"}
            for r in rec_ids
        ] if "items" in content else None
        props = {**content.get("properties", {}), **content.get("computations", {})}
        return {"recommendations": recs, "user_id": query.params.get("user_id", ""),
                "device_id": query.params.get("device_id", ""),
                "amp_props": props or None, "cohort_ids": content.get("cohort_ids")}

    def userprofile(self, params: Mapping[str, str]) -> Answer:
        """Call the API with already validated query parameters."""
        # Amplitude's docs give no status for the `not seen before` error, so accept it
        # on 200 and on the 4xx an unknown id may get.
        status, body = self.request(
            "GET", self.path, params=params, headers=self._headers, ok_statuses=(200, 400, 404)
        )
        if isinstance(body, dict) and NOT_SEEN in str(body.get("error", "")):
            return Answer(None, missing=True)
        if status != 200:
            self.raise_for_status(status, None)
        if not isinstance(body, dict) or not isinstance(body.get("userData"), dict):
            raise UpstreamBadAnswer(self.name, "amplitude answered without userData")
        return Answer(body["userData"])


def _rec_flags(rec_ids: Sequence[str], rec_type: str | None) -> dict[str, str]:
    # Sorted so that rec_id=a,b and rec_id=b,a share one cache entry; the shaper restores
    # the order asked for.
    flags = {"get_recs": "true", "rec_id": ",".join(sorted(rec_ids))}
    if rec_type:
        flags["rec_type"] = rec_type
    return flags
