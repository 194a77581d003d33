"""Start every sandbox upstream on loopback and say how to point the proxy at them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import amplitude, analytics, experiment, mediarithmics, target
from .base import SandboxState
from .server import RunningServer


@dataclass
class SandboxStack:
    servers: dict[str, RunningServer] = field(default_factory=dict)

    def state(self, name: str) -> SandboxState:
        return self.servers[name].app.config["SANDBOX"]

    def proxy_settings(self) -> dict[str, Any]:
        """Overrides that wire the proxy to these servers with their credentials."""
        return {
            "amplitude_url": self.servers["amplitude"].url,
            "amplitude_secret_key": amplitude.DEFAULT_KEY,
            "amplitude_api_key": analytics.DEFAULT_API_KEY,
            "amplitude_analytics_url": self.servers["amplitude"].url,
            "experiment_url": self.servers["experiment"].url,
            "experiment_deployment_key": experiment.DEFAULT_KEY,
            "experiment_flags_url": self.servers["experiment"].url,
            "target_url": self.servers["target"].url,
            "target_client_code": target.DEFAULT_CLIENT,
            "mediarithmics_url": self.servers["mediarithmics"].url,
            "mediarithmics_token": mediarithmics.DEFAULT_TOKEN,
            "mediarithmics_datamart_id": mediarithmics.DEFAULT_DATAMART,
        }

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def start(host: str = "127.0.0.1", latency: float = 0.0, rate_per_minute: int | None = None) -> SandboxStack:
    """Start all sandbox servers on free ports."""
    stack = SandboxStack()
    for name, module in (
        ("amplitude", amplitude), ("experiment", experiment),
        ("target", target), ("mediarithmics", mediarithmics),
    ):
        app = module.make_app(state=SandboxState(latency, rate_per_minute))
        stack.servers[name] = RunningServer(app, host).start()
    return stack
