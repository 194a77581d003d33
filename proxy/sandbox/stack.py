"""Start every sandbox upstream on loopback and say how to point the proxy at them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import amplitude
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
        }

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def start(host: str = "127.0.0.1", latency: float = 0.0, rate_per_minute: int | None = None) -> SandboxStack:
    """Start all sandbox servers on free ports."""
    stack = SandboxStack()
    stack.servers["amplitude"] = RunningServer(
        amplitude.make_app(state=SandboxState(latency, rate_per_minute)), host
    ).start()
    return stack
