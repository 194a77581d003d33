"""Client of the Adobe Target Profile API (`GET /rest/v1/profiles/...`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import urllib3

from ..config import credential_id
from ..errors import UpstreamBadAnswer
from .base import Answer, HttpClient, Query, path_segment


class TargetClient(HttpClient):
    name = "target"

    def __init__(self, pool: urllib3.PoolManager, base_url: str, client_code: str, token: str,
                 **http: Any):
        super().__init__(pool, base_url, **http)
        self.client_code = client_code
        # Profile API authentication is optional (enabled in the Target UI).
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.credential = credential_id(token)
        self.required = (("CCPROXY_TARGET_CLIENT_CODE", client_code),)

    def profile(self, tntid: str | None = None, third_party_id: str | None = None) -> Query:
        """One visitor profile by Target id (`tntid`) or by your own id (`third_party_id`)."""
        params = {"tntid": tntid} if tntid else {"third_party_id": third_party_id or ""}
        return Query(self, "profile", params, lambda: self._profile(tntid, third_party_id))

    def fallback(self, query: Query, content: Mapping[str, Any]) -> Any:
        """Operator defaults `profile = {"user.memberlevel" = "..."}` as a profile answer."""
        return {"profileAttributes": {k: {"value": str(v)} for k, v in content.get("profile", {}).items()}}

    def _profile(self, tntid: str | None, third_party_id: str | None) -> Answer:
        """404 "No profile found" is a missing profile."""
        if third_party_id is not None:
            path = f"/rest/v1/profiles/thirdPartyId/{path_segment(third_party_id)}"
        else:
            path = f"/rest/v1/profiles/{path_segment(tntid or '')}"
        status, body = self.request(
            "GET", path, params={"client": self.client_code}, headers=self._headers,
            ok_statuses=(200, 404),
        )
        if status == 404:
            if isinstance(body, dict) and "No profile found" in str(body.get("message", "")):
                return Answer(None, missing=True)
            self.raise_for_status(status, None)
        if not isinstance(body, dict):
            raise UpstreamBadAnswer(self.name, "target answered with something not an object")
        return Answer(body)
