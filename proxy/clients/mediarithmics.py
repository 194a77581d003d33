"""Client of the mediarithmics user point API: reads (profiles, user choices, a choice's
change log) as intents, and the writes the outbox delivers (activities, profile and choice
updates), described here and sent by `write`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import urllib3

from ..config import credential_id
from ..errors import UpstreamBadAnswer, UpstreamError, WriteMisdirected
from .base import Answer, HttpClient, Query, path_segment


def selector_path(selector: Mapping[str, str]) -> str:
    """`{"compartment_id": "1", "user_account_id": "a"}` -> `compartment_id=1,user_account_id=a`,
    each value percent-encoded so it cannot add path segments or selector parts."""
    return ",".join(f"{key}={path_segment(value)}" for key, value in selector.items())


@dataclass(frozen=True, slots=True)
class Write:
    """One write as mediarithmics takes it; the outbox stores it and `write` sends it."""

    method: str
    path: str
    body: Any
    query: dict[str, str] = field(default_factory=dict)


class MediarithmicsClient(HttpClient):
    name = "mediarithmics"

    def __init__(self, pool: urllib3.PoolManager, base_url: str, token: str, datamart_id: str,
                 **http: Any):
        super().__init__(pool, base_url, **http)
        # mediarithmics takes the API token raw, with no scheme.
        self._headers = {"Authorization": token}
        self.credential = credential_id(token)
        self.datamart_id = datamart_id
        self.required = (
            ("CCPROXY_MEDIARITHMICS_TOKEN", token),
            ("CCPROXY_MEDIARITHMICS_DATAMART_ID", datamart_id),
        )

    def _user_point(self, selector: Mapping[str, str]) -> str:
        """`/v1/datamarts/<id>/user_points/<selector>`, every part encoded."""
        return f"/v1/datamarts/{path_segment(self.datamart_id)}/user_points/{selector_path(selector)}"

    def _get_list(self, path: str) -> Answer:
        status, body = self.request("GET", path, headers=self._headers, ok_statuses=(200, 404))
        if status == 404:
            return Answer(None, missing=True)
        if not isinstance(body, dict) or body.get("status") != "ok":
            raise UpstreamBadAnswer(self.name, "mediarithmics answered without the ok envelope")
        data = body.get("data")
        return Answer(data if isinstance(data, list) else [data] if data else [])

    # Reads

    def profiles(self, selector: Mapping[str, str]) -> Query:
        path = self._user_point(selector) + "/user_profiles"
        return Query(self, "user_profiles", dict(selector), lambda: self._get_list(path))

    def choices(self, selector: Mapping[str, str], processing_id: str | None = None) -> Query:
        """The user's choices, or only those of one processing."""
        path = self._user_point(selector) + "/user_choices"
        params = dict(selector)
        if processing_id:
            path += f"/processing_id={path_segment(processing_id)}"
            params["processing_id"] = processing_id
        return Query(self, "user_choices", params, lambda: self._get_list(path))

    def choice_history(self, selector: Mapping[str, str], processing_id: str) -> Query:
        path = self.choice_path(selector, processing_id) + "/change_log"
        return Query(self, "choice_change_log", {**selector, "processing_id": processing_id},
                     lambda: self._get_list(path))

    def fallback(self, query: Query, content: Mapping[str, Any]) -> Any:
        """Operator defaults as mediarithmics' lists: `profile = {...}` as the one profile,
        `choices = {"101" = false}` as user choices; a change log has none."""
        if query.operation == "user_profiles":
            return [dict(content.get("profile", {}))]
        if query.operation == "user_choices":
            return [{"$processing_id": str(pid), "$choice_acceptance_value": bool(accepted)}
                    for pid, accepted in content.get("choices", {}).items()]
        return None

    # Writes (stored in the outbox, sent by `write`)

    def choice_path(self, selector: Mapping[str, str], processing_id: str) -> str:
        """Where one user choice lives (a write's path, and the outbox's lane for it)."""
        return self._user_point(selector) + f"/user_choices/processing_id={path_segment(processing_id)}"

    def put_choice(self, selector: Mapping[str, str], processing_id: str, choice: Any) -> Write:
        return Write("PUT", self.choice_path(selector, processing_id), choice)

    def put_profile(self, selector: Mapping[str, str], compartment_id: str, user_account_id: str,
                    profile: Any, force_replace: bool, merge_objects: bool | None = None) -> Write:
        """A profile update; `merge_objects` only counts when not replacing (mediarithmics docs)."""
        query = {"force_replace": "true" if force_replace else "false"}
        if not force_replace and merge_objects is not None:
            query["merge_objects"] = "true" if merge_objects else "false"
        path = (self._user_point(selector)
                + f"/user_profiles/compartment_id={path_segment(compartment_id)}"
                + f"/user_account_id={path_segment(user_account_id)}")
        return Write("PUT", path, profile, query)

    def post_activity(self, activity: Any) -> Write:
        return Write("POST", f"/v1/datamarts/{path_segment(self.datamart_id)}/user_activities", activity)

    def write(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        """Send one write (from the outbox). A 4xx raises with the upstream's own message."""
        own = f"/v1/datamarts/{path_segment(self.datamart_id)}/"
        if path.startswith("/v1/datamarts/") and not path.startswith(own):
            # Stored by a proxy writing to another datamart (the outbox file is shared by
            # accident): sending it here would put another account's data in this one.
            raise WriteMisdirected(self.name, f"this write was accepted for {path.split('/user_')[0]}, "
                                   f"not for this proxy's datamart {self.datamart_id}; it was not sent")
        try:
            status, answer = self.request(
                method, path, params=query or None, headers=self._headers, json_body=body,
                ok_statuses=(200, 201, 202, 204, 400, 404, 409, 422),
            )
        except UpstreamBadAnswer as odd:
            if odd.upstream_status is not None and 200 <= odd.upstream_status < 300:
                # Applied: a write's outcome is its status. Sending it again for an unreadable
                # body (a gateway's "OK") would apply it again.
                self.breaker.success()
                return None
            raise
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise UpstreamError(
                self.name, f"mediarithmics refused the write: {message or f'HTTP {status}'}",
                upstream_status=status,
            )
        return answer
