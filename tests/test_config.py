import pytest

from proxy import config


def test_defaults():
    s = config.load(environ={})
    assert s.amplitude_url == "https://profile-api.amplitude.com"
    assert s.cache_ttl_recommendations == 300.0
    assert s.experiment_base_url == "https://api.lab.amplitude.com"


def test_precedence_file_env_overrides(tmp_path):
    path = tmp_path / "ccproxy.toml"
    path.write_text('cache_maxsize = 10\nCCPROXY_CACHE_TTL_COHORTS = 7\namplitude_secret_key = "from-file"\n')
    env = {"CCPROXY_CONFIG": str(path), "CCPROXY_CACHE_MAXSIZE": "20"}
    s = config.load(environ=env)
    assert s.cache_maxsize == 20  # env beats file
    assert s.cache_ttl_cohorts == 7.0  # file beats default
    assert s.amplitude_secret_key == "from-file"
    s = config.load(overrides={"cache_maxsize": 30}, environ=env)
    assert s.cache_maxsize == 30  # overrides beat env


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CCPROXY_AMPLITUDE_URL": "https://x.example/v1/userprofile"}, "CCPROXY_AMPLITUDE_URL"),
        ({"CCPROXY_AMPLITUDE_URL": "ftp://x"}, "CCPROXY_AMPLITUDE_URL"),
        ({"CCPROXY_CACHE_TTL_PROFILE": "soon"}, "CCPROXY_CACHE_TTL_PROFILE"),
        ({"CCPROXY_CACHE_MAXSIZE": "0"}, "CCPROXY_CACHE_MAXSIZE"),
        ({"CCPROXY_EXPERIMENT_REGION": "mars"}, "CCPROXY_EXPERIMENT_REGION"),
        # Each of these started a proxy that failed at send time (a 500 or a 503 per answer).
        ({"CCPROXY_CACHE_TTL_RECOMMENDATIONS": "inf"}, "CCPROXY_CACHE_TTL_RECOMMENDATIONS must be a finite"),
        ({"CCPROXY_UPSTREAM_CONNECT_TIMEOUT": "nan"}, "CCPROXY_UPSTREAM_CONNECT_TIMEOUT must be a finite"),
        ({"CCPROXY_BREAKER_RESET": "Infinity"}, "CCPROXY_BREAKER_RESET must be a finite"),
        ({"CCPROXY_UPSTREAM_MAX_BYTES": "0"}, "CCPROXY_UPSTREAM_MAX_BYTES must be at least 1"),
        ({"CCPROXY_OUTBOX_MAX_ATTEMPTS": "0"}, "CCPROXY_OUTBOX_MAX_ATTEMPTS must be at least 1"),
        ({"CCPROXY_OUTBOX_MAX_BACKOFF": "-1"}, "CCPROXY_OUTBOX_MAX_BACKOFF must be positive"),
        ({"CCPROXY_LINK_TTL_DAYS": "0"}, "CCPROXY_LINK_TTL_DAYS must be positive"),
        ({"CCPROXY_COALESCE_WAIT": "-1"}, "CCPROXY_COALESCE_WAIT must not be negative"),
        ({"CCPROXY_OUTBOX_PATH": " "}, "CCPROXY_OUTBOX_PATH must name a file"),
        ({"CCPROXY_AMPLITUDE_URL": ""}, "CCPROXY_AMPLITUDE_URL must not be empty"),
        ({"CCPROXY_MEDIARITHMICS_URL": "https://host:abc"}, "CCPROXY_MEDIARITHMICS_URL has a port"),
        ({"CCPROXY_LOG_LEVEL": "verbose"}, "CCPROXY_LOG_LEVEL must be one of"),
        ({"CCPROXY_REDIS_URL": "localhost:6379"}, "CCPROXY_REDIS_URL must look like redis://"),
        ({"CCPROXY_UPSTREAM_PROXY": "proxy.internal:3128"}, "CCPROXY_UPSTREAM_PROXY must look like http://"),
    ],
)
def test_malformed_settings_name_the_setting(env, message):
    with pytest.raises(config.SettingsError, match=message):
        config.load(environ=env)


def test_a_password_in_a_url_setting_is_refused_and_never_echoed():
    with pytest.raises(config.SettingsError) as caught:
        config.load(environ={"CCPROXY_AMPLITUDE_URL": "https://user:hunter2@profile-api.example"})
    assert "must not carry a user name or password" in str(caught.value)
    with pytest.raises(config.SettingsError) as caught:
        config.load(environ={"CCPROXY_REDIS_URL": "localhost:hunter2@6379"})
    assert "hunter2" not in str(caught.value)
    assert config.load(environ={"CCPROXY_REDIS_URL": "unix:///run/redis.sock"}).redis_url
    assert config.load(environ={"CCPROXY_REDIS_URL": "rediss://:pw@cache.internal:6380/0"}).redis_url


def test_a_config_path_that_is_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(config.SettingsError, match="cannot be read"):
        config.load(environ={"CCPROXY_CONFIG": str(tmp_path)})


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(config.SettingsError, match="does not exist"):
        config.load(environ={"CCPROXY_CONFIG": "/nonexistent/ccproxy.toml"})


def test_secrets_not_in_repr_and_masked():
    s = config.load(overrides={"amplitude_secret_key": "supersecretvalue"}, environ={})
    assert "supersecretvalue" not in repr(s)
    assert config.mask("supersecretvalue") == "********ue"
    assert "supersecretvalue" not in config.credential_id("supersecretvalue")
    assert "amplitude_secret_key" in config.secret_names()


def test_each_rate_limit_setting_is_read_for_its_upstream_by_name_not_by_string():
    import dataclasses
    import typing

    fields = {f.name.removeprefix("rate_limit_") for f in dataclasses.fields(config.Settings)
              if f.name.startswith("rate_limit_")}
    assert set(typing.get_args(config.RateLimited)) == fields  # every setting, nothing else
    values = {name: 60.0 * (i + 1) for i, name in enumerate(sorted(fields))}
    settings = config.load(overrides={"workers": 3, **{f"rate_limit_{n}": v for n, v in values.items()}},
                           environ={})
    for name, per_minute in values.items():
        assert settings.deployment_rate_limit(name) == per_minute
        assert settings.rate_limit(name) == per_minute / 3


def test_each_client_is_built_with_its_own_rate_limit(tmp_path):
    from proxy.services import Services

    settings = config.load(overrides={"rate_limit_amplitude": 60, "rate_limit_experiment": 120,
                                      "rate_limit_target": 180, "rate_limit_mediarithmics": 240,
                                      "workers": 2, "outbox_path": str(tmp_path / "o.sqlite3")},
                           environ={})
    services = Services.build(settings)
    try:
        limits = {client.name: client.limiter.per_minute
                  for client in [*services.clients, services.experiment_flags]}
        assert limits == {"amplitude": 30, "experiment": 60, "target": 90, "mediarithmics": 120,
                          "experiment-flags": 0}
        assert services.delivery_client().limiter is services.mediarithmics.limiter
    finally:
        services.close()


def test_a_mistyped_upstream_is_a_type_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    probe = tmp_path / "probe.py"
    probe.write_text("from proxy.config import Settings\n\n"
                     "Settings().rate_limit('amplitude')\n"
                     "Settings().rate_limit('amplitud')\n")
    done = subprocess.run([sys.executable, "-m", "mypy", str(probe), "--ignore-missing-imports",
                           "--follow-imports=silent", "--cache-dir", str(root / ".mypy_cache")],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "probe.py:4:" in errors[0] and "amplitud" in errors[0], done.stdout


def test_every_level_name_python_logging_takes_is_a_log_level():
    for level in ("warn", "FATAL", "notset", "debug"):
        assert config.load(environ={"CCPROXY_LOG_LEVEL": level}).log_level == level
