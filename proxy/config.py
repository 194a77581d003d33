"""Settings: the only module that reads the environment.

Order of precedence (lowest first): defaults, an optional TOML config file
(`CCPROXY_CONFIG` or the `config_file` argument), `CCPROXY_*` environment
variables, then explicit overrides (tests, the `demo` command).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import SettingsError  # raised here; kept importable as config.SettingsError

# The upstreams with a rate limit setting (`rate_limit_<name>`, by the client's name): a name
# outside these is a type error (mypy), not a limit silently read as "none".
RateLimited = Literal["amplitude", "experiment", "target", "mediarithmics"]

ENV_PREFIX = "CCPROXY_"

# Amplitude Experiment evaluation hosts by data region (seeds/amplitude-experiment-evaluation-api.txt).
EXPERIMENT_REGION_URLS = {
    "us": "https://api.lab.amplitude.com",
    "eu": "https://api.lab.eu.amplitude.com",
}
# Flag configuration (Flags API, local evaluation) hosts by data region.
EXPERIMENT_FLAGS_REGION_URLS = {
    "us": "https://api.lab.amplitude.com",
    "eu": "https://flag.lab.eu.amplitude.com",
}
EXPERIMENT_MODES = ("remote", "local")
# Amplitude HTTP V2 API hosts (exposure events of local evaluation) by data region.
ANALYTICS_REGION_URLS = {
    "us": "https://api2.amplitude.com",
    "eu": "https://api.eu.amplitude.com",
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _secret() -> Any:
    # repr=False keeps secrets out of logs and tracebacks that print the settings.
    return field(default="", repr=False)


@dataclass(frozen=True)
class Settings:
    """Every knob of the proxy; the env name of `foo_bar` is `CCPROXY_FOO_BAR`."""

    # Amplitude User Profile API
    amplitude_url: str = "https://profile-api.amplitude.com"
    amplitude_secret_key: str = _secret()
    # Amplitude Experiment Evaluation API
    experiment_url: str = ""  # empty: the region's URL
    experiment_region: str = "us"
    experiment_deployment_key: str = _secret()
    # remote: every variants call asks /v1/vardata; local: evaluate flag configurations in process
    experiment_mode: str = "remote"
    experiment_flags_url: str = ""  # empty: the region's Flags API URL
    experiment_flag_refresh: float = 30.0  # seconds between flag configuration fetches (per process)
    experiment_flag_max_age: float = 300.0  # older than this, local mode evaluates remotely
    # Amplitude Analytics (HTTP V2 API): local mode's exposure events; no key, no exposures.
    amplitude_api_key: str = _secret()
    amplitude_analytics_url: str = ""  # empty: the experiment region's HTTP V2 API host
    # Adobe Target Profile API
    target_client_code: str = ""
    target_url: str = ""  # empty: https://<client-code>.tt.omtrdc.net
    target_token: str = _secret()
    # mediarithmics
    mediarithmics_url: str = "https://api.mediarithmics.com"
    mediarithmics_token: str = _secret()
    mediarithmics_datamart_id: str = ""

    # Cache: seconds an answer stays fresh, by kind; not-found answers get their own TTL.
    cache_ttl_recommendations: float = 300.0
    cache_ttl_properties: float = 300.0
    cache_ttl_computations: float = 300.0
    cache_ttl_cohorts: float = 300.0
    cache_ttl_profile: float = 300.0
    cache_ttl_variants: float = 60.0
    cache_ttl_target_profile: float = 300.0
    cache_ttl_mediarithmics_profile: float = 300.0
    cache_ttl_choices: float = 60.0
    cache_ttl_negative: float = 60.0
    cache_maxsize: int = 100_000
    # How long a caller waits for an identical in-flight upstream call before failing.
    coalesce_wait: float = 1.5
    # Seconds past its TTL an entry is served at once while it is refreshed (RFC 5861).
    cache_grace: float = 30.0
    # Seconds past its TTL an entry is served when the upstream fails (stale-if-error).
    cache_max_stale: float = 3600.0

    # Every request's total budget; Braze gives a Connected Content call 2 s.
    request_deadline: float = 1.5
    # Liquid previews (POST /v1/preview/liquid), on python-liquid's own limits: loop
    # iterations (nested loops multiply), output bytes (also the bound on assigned
    # variables), and the seconds after which the render process is killed.
    preview_max_iterations: int = 50_000
    preview_max_output: int = 1_000_000
    preview_timeout: float = 3.0
    # connected_content calls one preview may make: the preview answers them from the send
    # path's endpoints, whose upstream budgets Braze's recipients need.
    preview_max_calls: int = 25
    # Previews rendering at once in each worker process; more answer 503 + Retry-After.
    preview_concurrency: int = 2
    # Message templates (/v1/render/*, the preview page): loop iterations in all, output
    # characters, seconds of rendering.
    render_max_iterations: int = 10_000
    render_max_output: int = 1_000_000
    render_timeout: float = 0.5
    # Calls per minute per upstream for the whole deployment (0: no limit).
    rate_limit_amplitude: float = 600.0
    rate_limit_experiment: float = 0.0
    rate_limit_target: float = 0.0
    rate_limit_mediarithmics: float = 0.0
    # Processes sharing the rate limits above (set by `ccproxy serve`; Redis shares them instead).
    workers: int = 1
    # Where `ccproxy serve`'s workers keep their metric values for /metrics to sum (emptied at
    # start, removed or emptied at exit); empty: a new directory under /dev/shm (or the temp dir).
    metrics_dir: str = ""
    # Circuit breaker: consecutive failures that open it, seconds before a probe.
    breaker_threshold: int = 5
    breaker_reset: float = 10.0
    # One answer cache for every worker of one machine (without Redis): a SQLite file that
    # `ccproxy serve` starts afresh; empty path: a new one under /dev/shm (or the temp dir).
    box_cache: bool = True
    box_cache_path: str = ""
    # Shared cache and rate limits for several processes or machines, e.g. redis://host:6379/0.
    redis_url: str = _secret()
    # The durable outbox of writes to mediarithmics (SQLite), and its retry policy.
    outbox_path: str = "ccproxy-outbox.sqlite3"
    outbox_max_attempts: int = 25
    outbox_max_backoff: float = 300.0
    # /readyz reports the outbox unwritable when its file system has less free space.
    outbox_min_free_mb: float = 10.0
    # Deliveries in flight at once per process (writes/s ~= this x workers / upstream latency).
    outbox_concurrency: int = 16
    # Seconds a delivery may wait for mediarithmics' answer (writes are not on the send path).
    outbox_write_timeout: float = 30.0
    # Seconds delivered rows are kept before they are purged (7 days).
    outbox_retention: float = 604800.0
    # Undelivered rows past which new opens and activities are refused at intake (0: no cap).
    outbox_max_rows: int = 1_000_000
    # Seconds an Idempotency-Key is remembered (24 h).
    idempotency_ttl: float = 86400.0
    # Seconds within which the same pixel link is recorded once (1 h).
    pixel_dedup_window: float = 3600.0
    # Record unsigned pixels when no CCPROXY_LINK_SECRET is set (anyone could forge them).
    allow_unsigned_pixel: bool = False
    # Signs one-click consent links and email-open pixels (HMAC-SHA256).
    link_secret: str = _secret()
    link_ttl_days: float = 30.0
    # TOML file of fallback content per endpoint path (see README, Operations).
    fallbacks_file: str = ""
    # Recommendations answer "none for now" (200, found: false, fallback: true) instead of a
    # 503 while Amplitude is rate limited and nothing is cached: Braze's :retry cannot outlast
    # a Retry-After, and its failed retries would halt the whole host (README, Operations).
    recommendations_rate_limit_fallback: bool = True

    # Upstream HTTP: timeouts in seconds, answer size cap in bytes.
    upstream_connect_timeout: float = 0.5
    upstream_read_timeout: float = 1.4
    upstream_max_bytes: int = 1_000_000
    # An egress proxy for upstream calls, e.g. http://proxy.internal:3128 (environment
    # variables such as HTTPS_PROXY are not read).
    upstream_proxy: str = _secret()  # may carry credentials

    # Inbound connections, per `ccproxy serve` worker process. A client has this many seconds
    # from its first byte (or from connecting) to send a request's headers, then `body_timeout`
    # for its whole body; an idle keep-alive connection waits up to `keepalive_timeout` for its
    # next request; an answer must be taken by the client within `send_timeout`.
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 10.0
    send_timeout: float = 5.0
    # Connections one worker holds; past it the idle and slowest-to-send ones are closed first
    # (a request being answered never is).
    max_connections: int = 2000
    # Largest request body accepted (bytes); larger is a 413.
    max_body: int = 1_000_000
    # Plain GETs of the data endpoints answered by the worker's fast lane (proxy/fast_lane.py);
    # false: gunicorn parses every request, as before the lane.
    fast_lane: bool = True

    log_level: str = "INFO"
    # Inbound API keys, comma-separated (several for rotation); empty: no auth.
    api_keys: str = _secret()
    # Where message templates live (default: the repository's templates/).
    templates_dir: str = ""
    # The proxy's public base URL, used in Braze snippets and allowed in Liquid previews.
    public_url: str = ""
    # The Braze expression that yields a recipient's email_hash in snippets: it must hash
    # the way the mediarithmics datamart does.
    email_hash_liquid: str = "{{${email_address} | downcase | sha2}}"
    # The Braze Connected Content credential snippets name in `:basic_auth` (when keys are on).
    braze_credential: str = "ccproxy"

    def deployment_rate_limit(self, upstream: RateLimited) -> float:
        """Calls per minute the whole deployment may make to `upstream` (0: no limit)."""
        limits: dict[RateLimited, float] = {
            "amplitude": self.rate_limit_amplitude,
            "experiment": self.rate_limit_experiment,
            "target": self.rate_limit_target,
            "mediarithmics": self.rate_limit_mediarithmics,
        }
        return float(limits[upstream])

    def rate_limit(self, upstream: RateLimited) -> float:
        """Calls per minute this process may make (the deployment's limit split over workers)."""
        return self.deployment_rate_limit(upstream) / max(1, self.workers)

    @property
    def experiment_base_url(self) -> str:
        return self.experiment_url or EXPERIMENT_REGION_URLS[self.experiment_region]

    @property
    def experiment_flags_base_url(self) -> str:
        return self.experiment_flags_url or EXPERIMENT_FLAGS_REGION_URLS[self.experiment_region]

    @property
    def analytics_base_url(self) -> str:
        return self.amplitude_analytics_url or ANALYTICS_REGION_URLS[self.experiment_region]

    @property
    def target_base_url(self) -> str:
        if self.target_url:
            return self.target_url
        return f"https://{self.target_client_code}.tt.omtrdc.net" if self.target_client_code else ""

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def secret_names() -> list[str]:
    """Names of the settings that hold credentials."""
    return [f.name for f in fields(Settings) if not f.repr]


def credential_id(secret: str) -> str:
    """A short, one-way tag of a credential: cache keys and logs use this, never the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16] if secret else "none"


def mask(secret: str) -> str:
    """What an operator may see of a secret: its length and last two characters at most."""
    if not secret:
        return "(unset)"
    return "*" * min(len(secret) - 2, 8) + secret[-2:] if len(secret) > 6 else "*" * len(secret)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def _coerce(name: str, kind: type, raw: Any) -> Any:
    value = _coerced(name, kind, raw)
    # `inf` and `nan` read as numbers, and pass every `< 0` check (NaN compares false), then
    # fail at send time: an inf TTL made every answer a 500.
    if kind is float and not math.isfinite(value):
        raise SettingsError(f"{env_name(name)} must be a finite number, got {str(raw).strip()!r}")
    return value


def _coerced(name: str, kind: type, raw: Any) -> Any:
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, kind) and (kind is bool or not isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    if kind is bool:
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise SettingsError(f"{env_name(name)} must be true or false, got {text!r}")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise SettingsError(f"{env_name(name)} must be a number, got {text!r}") from None
    return text


def _field_types() -> dict[str, type]:
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints[str(f.type)] for f in fields(Settings)}


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except OSError as exc:  # a directory, no permission
        raise SettingsError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept both `amplitude_url` and `CCPROXY_AMPLITUDE_URL` spellings.
    return {key.lower().removeprefix(ENV_PREFIX.lower()): value for key, value in data.items()}


def load(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build validated settings from defaults, file, environment and overrides."""
    environ = os.environ if environ is None else environ
    types = _field_types()
    values: dict[str, Any] = {}
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    layers: list[Mapping[str, Any]] = [_read_file(path)] if path else []
    layers.append(
        {name: environ[env_name(name)] for name in types if env_name(name) in environ}
    )
    layers.append(overrides or {})
    for layer in layers:
        for name, raw in layer.items():
            if name not in types:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _coerce(name, types[name], raw)
    return validate(Settings(**values))


def is_set(name: str, config_file: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the operator gave `name` (environment or config file), not left its default."""
    environ = os.environ if environ is None else environ
    if env_name(name) in environ:
        return True
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if not path:
        return False
    return name in _read_file(path)


def _check_base_url(name: str, value: str, required: bool = False) -> None:
    if not value:
        if required:  # an empty vendor URL is a typo: every call would fail at send time
            raise SettingsError(f"{env_name(name)} must not be empty (leave it unset for the default)")
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{env_name(name)} must look like scheme://host[:port], got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SettingsError(
            f"{env_name(name)} must be scheme://host[:port] only; the proxy appends the API path"
        )
    if parts.username is not None or parts.password is not None:
        # Credentials have their own settings (never printed); a URL is logged and shown.
        raise SettingsError(f"{env_name(name)} must not carry a user name or password")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError:
        raise SettingsError(f"{env_name(name)} has a port that is not a number from 0 to 65535") from None


def _check_service_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    """A URL that may carry a password (Redis, an egress proxy): checked, never echoed."""
    if not value:
        return
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port >= 0
    except ValueError:
        port_ok = False
    where = parts.path if parts.scheme == "unix" else parts.hostname  # unix:///path/to/redis.sock
    if parts.scheme not in schemes or not where or not port_ok:
        raise SettingsError(f"{env_name(name)} must look like {schemes[0]}://[user:password@]host[:port] "
                            f"(scheme one of {', '.join(schemes)}); its value is not shown")


def validate(settings: Settings) -> Settings:
    """Reject malformed settings with a message naming the setting."""
    for name in ("amplitude_url", "experiment_url", "target_url", "mediarithmics_url", "public_url",
                 "experiment_flags_url", "amplitude_analytics_url"):
        _check_base_url(name, getattr(settings, name), required=name in ("amplitude_url", "mediarithmics_url"))
    _check_service_url("redis_url", settings.redis_url, ("redis", "rediss", "unix"))
    _check_service_url("upstream_proxy", settings.upstream_proxy, ("http", "https"))
    if settings.log_level.upper() not in logging.getLevelNamesMapping():  # WARN and FATAL too
        raise SettingsError(f"{env_name('log_level')} must be one of {', '.join(LOG_LEVELS)}, "
                            f"got {settings.log_level!r}")
    if not settings.outbox_path.strip():
        raise SettingsError(f"{env_name('outbox_path')} must name a file")
    for name in ("upstream_max_bytes", "outbox_max_attempts"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{env_name(name)} must be at least 1")
    for name in ("outbox_max_backoff", "link_ttl_days"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{env_name(name)} must be positive")
    for name in ("coalesce_wait", "outbox_min_free_mb"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{env_name(name)} must not be negative")
    if settings.experiment_mode not in EXPERIMENT_MODES:
        raise SettingsError(f"{env_name('experiment_mode')} must be one of {list(EXPERIMENT_MODES)}")
    if not 0 < settings.experiment_flag_refresh <= settings.experiment_flag_max_age:
        raise SettingsError(f"{env_name('experiment_flag_refresh')} must be positive and at most "
                            f"{env_name('experiment_flag_max_age')}")
    if settings.experiment_region not in EXPERIMENT_REGION_URLS:
        raise SettingsError(
            f"{env_name('experiment_region')} must be one of {sorted(EXPERIMENT_REGION_URLS)}"
        )
    for ttl in fields(settings):  # every cache kind's CCPROXY_CACHE_TTL_<KIND>
        if ttl.name.startswith("cache_ttl_") and getattr(settings, ttl.name) < 0:
            raise SettingsError(f"{env_name(ttl.name)} must not be negative")
    if settings.cache_maxsize < 1:
        raise SettingsError(f"{env_name('cache_maxsize')} must be at least 1")
    if settings.upstream_connect_timeout <= 0 or settings.upstream_read_timeout <= 0:
        raise SettingsError("upstream timeouts must be positive")
    if not 0 < settings.request_deadline <= 30:
        raise SettingsError(f"{env_name('request_deadline')} must be between 0 and 30 seconds")
    for name in ("cache_grace", "cache_max_stale", "rate_limit_amplitude", "rate_limit_experiment",
                 "rate_limit_target", "rate_limit_mediarithmics", "breaker_reset"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{env_name(name)} must not be negative")
    for name in ("preview_max_iterations", "preview_max_output", "preview_timeout", "preview_max_calls",
                 "preview_concurrency", "render_max_iterations", "render_max_output", "render_timeout"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{env_name(name)} must be positive")
    for name in ("outbox_retention", "outbox_max_rows", "idempotency_ttl", "pixel_dedup_window"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{env_name(name)} must not be negative")
    if settings.outbox_concurrency < 1 or settings.outbox_write_timeout <= 0:
        raise SettingsError(f"{env_name('outbox_concurrency')} must be at least 1 and "
                            f"{env_name('outbox_write_timeout')} positive")
    if settings.workers < 1 or settings.breaker_threshold < 1:
        raise SettingsError("workers and breaker_threshold must be at least 1")
    for name in ("header_timeout", "keepalive_timeout", "body_timeout", "send_timeout"):
        if not 0 < getattr(settings, name) <= 3600:
            raise SettingsError(f"{env_name(name)} must be between 0 and 3600 seconds")
    for name in ("max_connections", "max_body"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{env_name(name)} must be at least 1")
    return settings
