"""`ccproxy check`: is this configuration ready to serve? Validates the settings, then calls
each configured upstream once with a harmless read and reports reachability, whether the
credential was accepted, and latency. Exit status 1 on any failure, so it can gate a deploy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from .config import Settings, mask
from .errors import NotConfigured, UpstreamAuthError, UpstreamError
from .services import Services

PROBE_ID = "ccproxy-check"


@dataclass
class Probe:
    upstream: str
    url: str
    secret: str  # shown masked
    status: str  # ok, skipped, credentials_refused, unreachable, failed
    detail: str
    ms: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "skipped")


def _probes(services: Services) -> list[tuple[str, str, str, Callable[[], object]]]:
    s: Settings = services.settings
    point = {"user_point_id": PROBE_ID}
    return [
        ("amplitude", s.amplitude_url, s.amplitude_secret_key,
         lambda: services.amplitude.userprofile({"user_id": PROBE_ID})),
        ("experiment", s.experiment_base_url, s.experiment_deployment_key,
         lambda: services.experiment.vardata({"user_id": PROBE_ID, "flag_keys": PROBE_ID}, track=False)),
        ("target", s.target_base_url or "(no client code)", s.target_token,
         lambda: services.target.profile(third_party_id=PROBE_ID).send()),
        ("mediarithmics", s.mediarithmics_url, s.mediarithmics_token,
         lambda: services.mediarithmics.profiles(point).send()),
    ]


def run_checks(settings: Settings) -> list[Probe]:
    services = Services.build(settings)
    results = []
    for name, url, secret, call in _probes(services):
        started = time.perf_counter()
        try:
            call()
            status, detail = "ok", "reachable, credentials accepted"
        except NotConfigured as exc:
            status, detail = "skipped", exc.message
        except UpstreamAuthError:
            status, detail = "credentials_refused", "reachable, but the credential was refused (401/403)"
        except UpstreamError as exc:
            reachable = exc.upstream_status is not None
            status = "failed" if reachable else "unreachable"
            detail = f"{exc.code}: {exc.message}"
        results.append(Probe(name, url, mask(secret), status, detail,
                             (time.perf_counter() - started) * 1000))
    return results


def warnings(settings: Settings) -> list[str]:
    """Configuration that works but is unsafe or half set up (printed, not a failure)."""
    from .cli import link_secret_warning

    found = [link_secret_warning(settings)]
    return [w for w in found if w]


def report(results: list[Probe], out: TextIO, notes: list[str] | None = None) -> int:
    """Print one line per upstream, then warnings; the exit status for the command."""
    width = max(len(r.upstream) for r in results)
    for r in results:
        mark = {"ok": "OK  ", "skipped": "--  "}.get(r.status, "FAIL")
        latency = f"{r.ms:7.1f} ms" if r.status != "skipped" else "          "
        out.write(f"{mark} {r.upstream:<{width}}  {latency}  {r.url}  credential {r.secret}  {r.detail}\n")
    for note in notes or []:
        out.write(f"WARN {note}\n")
    configured = [r for r in results if r.status != "skipped"]
    if not configured:
        out.write("no upstream is configured: set at least one upstream's settings (see README)\n")
        return 1
    failed = [r for r in results if r.failed]
    out.write(f"{len(configured) - len(failed)} of {len(configured)} configured upstreams healthy\n")

    return 1 if failed else 0
