"""Fixtures: sandbox upstreams on loopback (real HTTP), a proxy app wired to them, a fake clock."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from servers import Servers, servers_fixture

from proxy import config, create_app
from proxy.sandbox import experiment as experiment_sandbox
from proxy.sandbox import stack

DATA = Path(__file__).parent / "data"


def load_json(relative: str):
    return json.loads((DATA / relative).read_text())


class FakeClock:
    """A monotonic clock that moves only when told: TTL tests do not sleep."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session", autouse=True)
def _files_stay_in_a_temporary_directory(tmp_path_factory):
    """Outbox databases and other files the proxy writes go to a scratch directory, never the
    checkout: apps run with the working directory there, subprocesses inherit it."""
    workdir = tmp_path_factory.mktemp("workdir")
    previous = os.getcwd()
    os.chdir(workdir)
    os.environ["CCPROXY_OUTBOX_PATH"] = str(workdir / "outbox.sqlite3")
    yield workdir
    os.chdir(previous)


@pytest.fixture(scope="session")
def sandboxes():
    running = stack.start()
    experiment_sandbox.warm()  # the sandbox's engine imported before any deadline runs
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _fresh_sandboxes(request):
    """Each test starts with sandbox counters and faults cleared."""
    if "sandboxes" in request.fixturenames:
        running = request.getfixturevalue("sandboxes")
        for name in running.servers:
            running.state(name).reset()
    yield


@pytest.fixture
def servers(tmp_path) -> Servers:
    """Start real server processes; each is stopped when the test ends, even when it fails."""
    yield from servers_fixture(tmp_path)


@pytest.fixture
def guarded_server(sandboxes, servers, tmp_path):
    """`ccproxy serve --workers 2` on the sandboxes, with settings as keyword arguments
    (test_connections.KEY is its API key)."""
    from test_connections import KEY

    def start(**settings):
        env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
        env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_LOG_LEVEL": "WARNING",
                    "CCPROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3")})
        env.update({"CCPROXY_" + k.upper(): str(v) for k, v in settings.items()})
        return servers.start(["serve", "--workers", "2"], env)

    return start


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_app(sandboxes, clock, tmp_path):
    """Build a proxy app on the sandboxes; keyword overrides change settings. Background
    delivery of the outbox starts as `ccproxy serve` starts it in each worker, unless
    `start_delivery=False` (create_app itself starts nothing)."""

    built = []

    def build(*, start_delivery: bool = True, endpoints=None, **overrides):
        overrides.setdefault("outbox_path", str(tmp_path / f"outbox-{len(built)}.sqlite3"))
        settings = config.load(overrides={**sandboxes.proxy_settings(), **overrides}, environ={})
        app = create_app(settings, timer=clock, endpoints=endpoints)
        app.config["TESTING"] = True
        if start_delivery:
            app.extensions["ccproxy"].start_delivery()
        built.append(app)
        return app

    yield build
    for app in built:
        app.extensions["ccproxy"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def upstream_calls(sandboxes, name: str = "amplitude") -> int:
    return sandboxes.state(name).calls


def all_keys(value):
    """Every key at every depth of a JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from all_keys(child)
    elif isinstance(value, list):
        for child in value:
            yield from all_keys(child)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (Debian's package, installed by scripts/test) on a free port."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run the README's test command (bash scripts/test)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60  # an overall limit for a slow boot, not a speed check
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield {"url": url, "port": port, "proc": proc, "client": client}
    finally:
        proc.terminate()
        proc.wait(30)
