"""What a request handler may use: the settings, the answer cache and one client per upstream.

Built once per app by `create_app`; a test app gets fresh ones.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .cache import AnswerCache, Lookup, MemoryStore, Timer, cache_key
from .clients.amplitude import AmplitudeClient
from .clients.base import Answer, make_session
from .clients.experiment import ExperimentClient
from .clients.mediarithmics import MediarithmicsClient
from .clients.target import TargetClient
from .config import Settings


class Services:
    def __init__(self, settings: Settings, timer: Timer = time.monotonic):
        self.settings = settings
        self.session = make_session()
        http = {
            "connect_timeout": settings.upstream_connect_timeout,
            "read_timeout": settings.upstream_read_timeout,
            "max_bytes": settings.upstream_max_bytes,
        }
        self.cache = AnswerCache(
            MemoryStore(settings.cache_maxsize, timer), timer, settings.coalesce_wait
        )
        self.amplitude = AmplitudeClient(
            self.session, settings.amplitude_url, settings.amplitude_secret_key, **http
        )
        self.experiment = ExperimentClient(
            self.session, settings.experiment_base_url, settings.experiment_deployment_key, **http
        )
        self.target = TargetClient(
            self.session, settings.target_base_url, settings.target_client_code,
            settings.target_token, **http
        )
        self.mediarithmics = MediarithmicsClient(
            self.session, settings.mediarithmics_url, settings.mediarithmics_token,
            settings.mediarithmics_datamart_id, **http
        )

    def ttl_of(self, kind: str) -> Callable[[Answer], float]:
        """How long an answer of this kind stays fresh; not-found answers get the negative TTL."""
        fresh, negative = self.settings.ttl(kind), self.settings.cache_ttl_negative
        return lambda answer: negative if answer.missing else fresh

    def cached(
        self, kind: str, client: Any, operation: str, params: dict[str, str],
        call: Callable[[], Answer],
    ) -> Lookup:
        """One upstream call through the cache, keyed without any secret in clear."""
        key = cache_key(client.name, client.credential, operation, params)
        return self.cache.fetch(key, call, self.ttl_of(kind))
