"""Client of the mediarithmics user point API (profiles, user choices)."""

from __future__ import annotations

from typing import Any

from ..config import credential_id
from ..errors import UpstreamBadAnswer, UpstreamError
from .base import Answer, HttpClient, path_segment


def selector_path(selector: dict[str, str]) -> str:
    """`{"compartment_id": "1", "user_account_id": "a"}` -> `compartment_id=1,user_account_id=a`,
    each value percent-encoded so it cannot add path segments or selector parts."""
    return ",".join(f"{key}={path_segment(value)}" for key, value in selector.items())


class MediarithmicsClient(HttpClient):
    name = "mediarithmics"

    def __init__(self, pool, base_url: str, token: str, datamart_id: str, **http):
        super().__init__(pool, base_url, **http)
        # mediarithmics takes the API token raw, with no scheme.
        self._headers = {"Authorization": token}
        self.credential = credential_id(token)
        self.datamart_id = datamart_id
        self.required = (
            ("CCPROXY_MEDIARITHMICS_TOKEN", token),
            ("CCPROXY_MEDIARITHMICS_DATAMART_ID", datamart_id),
        )

    def _user_point(self, selector: dict[str, str]) -> str:
        return f"/v1/datamarts/{path_segment(self.datamart_id)}/user_points/{selector_path(selector)}"

    def _get_list(self, path: str) -> Answer:
        status, body = self.request("GET", path, headers=self._headers, ok_statuses=(200, 404))
        if status == 404:
            return Answer(None, missing=True)
        if not isinstance(body, dict) or body.get("status") != "ok":
            raise UpstreamBadAnswer(self.name, "mediarithmics answered without the ok envelope")
        data = body.get("data")
        return Answer(data if isinstance(data, list) else [data] if data else [])

    def user_point_path(self, selector: dict[str, str]) -> str:
        """`/v1/datamarts/<id>/user_points/<selector>`, every part encoded."""
        return self._user_point(selector)

    def write(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        """Send one write (from the outbox). A 4xx raises with the upstream's own message."""
        status, answer = self.request(
            method, path, params=query or None, headers=self._headers, json_body=body,
            ok_statuses=(200, 201, 202, 204, 400, 404, 409, 422),
        )
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise UpstreamError(
                self.name, f"mediarithmics refused the write: {message or f'HTTP {status}'}",
                upstream_status=status,
            )
        return answer

    def profiles(self, selector: dict[str, str]) -> Answer:
        return self._get_list(self._user_point(selector) + "/user_profiles")

    def choices(self, selector: dict[str, str], processing_id: str | None = None) -> Answer:
        path = self._user_point(selector) + "/user_choices"
        if processing_id:
            path += f"/processing_id={path_segment(processing_id)}"
        return self._get_list(path)

    def choice_history(self, selector: dict[str, str], processing_id: str) -> Answer:
        path = (
            self._user_point(selector)
            + f"/user_choices/processing_id={path_segment(processing_id)}/change_log"
        )
        return self._get_list(path)
