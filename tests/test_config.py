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
    ],
)
def test_malformed_settings_name_the_setting(env, message):
    with pytest.raises(config.SettingsError, match=message):
        config.load(environ=env)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(config.SettingsError, match="does not exist"):
        config.load(environ={"CCPROXY_CONFIG": "/nonexistent/ccproxy.toml"})


def test_secrets_not_in_repr_and_masked():
    s = config.load(overrides={"amplitude_secret_key": "supersecretvalue"}, environ={})
    assert "supersecretvalue" not in repr(s)
    assert config.mask("supersecretvalue") == "********ue"
    assert "supersecretvalue" not in config.credential_id("supersecretvalue")
    assert "amplitude_secret_key" in config.secret_names()
