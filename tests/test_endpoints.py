"""The endpoint registry belongs to the app: `@endpoint` registers nowhere, `build_registry`
makes a new registry, and each app routes, documents and times only its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

import pytest

from proxy import config
from proxy.app import create_app
from proxy.endpoints import Context, Endpoint, Registry, Result, build_registry, endpoint
from proxy.services import of_app

PUBLIC = {
    "/v1/amplitude/recommendations", "/v1/amplitude/properties", "/v1/amplitude/computations",
    "/v1/amplitude/cohorts", "/v1/amplitude/profile", "/v1/experiment/variants",
    "/v1/mediarithmics/profile", "/v1/mediarithmics/choices", "/v1/mediarithmics/choices/history",
    "/v1/adobe-target/profile",
}


@endpoint("/v1/test/echo", "A test-only endpoint.", ("say",))
def echo(ctx: Context, args: Mapping[str, str]) -> Result:
    return Result({"ok": True, "found": True, "said": args.get("say", "")})


def test_build_registry_has_every_public_endpoint_each_time_anew():
    first, second = build_registry(), build_registry()
    assert set(first) == PUBLIC
    assert first is not second and dict(first) == dict(second)
    assert all(isinstance(e, Endpoint) and e.path == path for path, e in first.items())
    assert "/v1/test/echo" not in first  # defined in this module, which no registry collects


def test_a_registry_is_read_only_and_rejects_two_endpoints_on_one_path():
    registry = build_registry([echo])
    assert registry["/v1/test/echo"] is echo
    with pytest.raises(TypeError):
        registry["/v1/other"] = echo  # type: ignore[index]
    with pytest.raises(ValueError, match="/v1/test/echo"):
        Registry([echo, echo])


def test_importing_the_endpoint_modules_changes_no_global_state():
    # A fresh interpreter: every mutable module-level value of the endpoints package, and
    # every Endpoint anywhere, before and after importing each endpoint module.
    code = """
import sys
import proxy.endpoints as package
from proxy.endpoints import Endpoint

def state():
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("proxy"):
            continue
        for attr, value in vars(module).items():
            if isinstance(value, (dict, list, set)) and any(
                isinstance(v, Endpoint) for v in (value.values() if isinstance(value, dict) else value)
            ):
                found[f"{name}.{attr}"] = len(value)
    return found

before = state()
import proxy.endpoints.amplitude, proxy.endpoints.experiment
import proxy.endpoints.mediarithmics, proxy.endpoints.target
after = state()
assert before == after == {}, (before, after)
assert not hasattr(package, "REGISTRY")
registry = package.build_registry()
assert len(registry) >= 10 and package.build_registry() is not registry
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.fixture
def two_apps(sandboxes, clock, tmp_path):
    """Two apps in one process, with different settings; the first with a test endpoint."""
    def settings(name: str, ttl: int) -> config.Settings:
        return config.load(overrides={**sandboxes.proxy_settings(), "cache_ttl_properties": ttl,
                                      "outbox_path": str(tmp_path / f"{name}.sqlite3")}, environ={})

    first = create_app(settings("first", 11), timer=clock, endpoints=build_registry([echo]))
    second = create_app(settings("second", 22), timer=clock)
    try:
        yield first, second
    finally:
        for app in (first, second):
            of_app(app).close()


def test_two_apps_in_one_process_have_independent_registries(two_apps):
    first, second = two_apps
    one, two = of_app(first).endpoints, of_app(second).endpoints
    assert one is not two
    assert "/v1/test/echo" in one and "/v1/test/echo" not in two

    # Routed only by the app that registered it, even though the other was built later.
    answered = first.test_client().get("/v1/test/echo?say=hi")
    assert answered.status_code == 200 and answered.get_json()["said"] == "hi"
    refused = second.test_client().get("/v1/test/echo?say=hi")
    assert refused.status_code == 404 and refused.get_json()["error"]["code"] == "not_found"

    # Documented only by its app's registry (the second app's document has none of the first's).
    doc = second.test_client().get("/openapi.json").get_json()
    assert "/v1/test/echo" not in doc["paths"] and PUBLIC <= set(doc["paths"])

    # Each app times its endpoints by its own settings.
    assert one.fresh_seconds(of_app(first).settings)("/v1/amplitude/properties") == 11
    assert two.fresh_seconds(of_app(second).settings)("/v1/amplitude/properties") == 22
    assert two.fresh_seconds(of_app(second).settings)("/v1/test/echo") is None


def test_in_process_calls_use_the_apps_own_registry(two_apps):
    from proxy.endpoints import call

    first, second = two_apps
    assert call(of_app(first), "/v1/test/echo", {"say": "x"}).body["said"] == "x"
    with pytest.raises(KeyError):
        call(of_app(second), "/v1/test/echo", {"say": "x"})


def test_every_endpoint_module_is_collected():
    import pkgutil

    import proxy.endpoints as package
    from proxy.endpoints import endpoint_modules, registrations

    modules = endpoint_modules()
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} == {
        info.name for info in pkgutil.iter_modules(package.__path__)}
    assert all(registrations(m) for m in modules)  # each defines endpoints
