"""Client of the Amplitude User Profile API (`GET /v1/userprofile`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import credential_id
from ..errors import UpstreamBadAnswer
from .base import Answer, HttpClient

NOT_SEEN = "not seen before"


class AmplitudeClient(HttpClient):
    """Asks for one user's profile; `not seen before` becomes a missing Answer."""

    name = "amplitude"
    path = "/v1/userprofile"

    def __init__(self, pool, base_url: str, secret_key: str, **http):
        super().__init__(pool, base_url, **http)
        # Amplitude's documented header form; the key itself never leaves this object.
        self._headers = {"Authorization": f"Api-Key {secret_key}"}
        self.required = (("CCPROXY_AMPLITUDE_SECRET_KEY", secret_key),)
        self.credential = credential_id(secret_key)

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
