"""proxy/services.py: the typed services an app is built with. Each client is built whole,
with its own guards from the settings (no placeholder replaced later), and reports each
call to the app's metrics."""

from __future__ import annotations

import pytest

from proxy import config
from proxy.clients.amplitude import AmplitudeClient
from proxy.clients.base import make_pool
from proxy.errors import CircuitOpen
from proxy.guards import CircuitBreaker, Guards, RateLimiter, RetryBudget
from proxy.services import Services, of_app


@pytest.fixture
def app(make_app):
    return make_app(start_delivery=False, breaker_threshold=3, breaker_reset=7.0,
                    rate_limit_amplitude=600.0, workers=2)


def test_the_app_holds_its_services_typed(app):
    services = of_app(app)
    assert isinstance(services, Services) and services is app.extensions["ccproxy"]
    assert services.settings.breaker_threshold == 3


def test_each_upstream_has_its_own_guards_from_the_settings(app):
    services = of_app(app)
    clients = [services.amplitude, services.experiment, services.experiment_flags,
               services.target, services.mediarithmics]
    assert len({id(c.breaker) for c in clients}) == len({id(c.limiter) for c in clients}) == len(clients)
    assert len({id(c.retry_budget) for c in clients}) == len(clients)
    amplitude = services.amplitude
    assert (amplitude.breaker.upstream, amplitude.breaker.threshold, amplitude.breaker.reset_after) == (
        "amplitude", 3, 7.0)
    # The deployment's limit is split over the workers (per process, in memory).
    assert amplitude.limiter.state["per_minute"] == 300.0
    assert services.target.limiter.state["tokens"] is None  # no limit configured
    assert amplitude.breaker.timer is services.timer  # the app's (test) clock


def test_deliveries_have_their_own_breaker_and_share_the_reads_limiter(app):
    services = of_app(app)
    delivery = services.delivery_client()
    assert delivery.limiter is services.mediarithmics.limiter  # one upstream budget
    assert delivery.breaker is not services.mediarithmics.breaker
    assert delivery.timeout[1] == services.settings.outbox_write_timeout
    assert delivery.observe == services.observe


def test_a_client_obeys_the_guards_it_was_built_with(sandboxes, clock):
    settings = config.load(overrides=sandboxes.proxy_settings(), environ={})
    breaker = CircuitBreaker("amplitude", threshold=1, reset_after=30, timer=clock)
    seen = []
    client = AmplitudeClient(
        make_pool(), settings.amplitude_url, settings.amplitude_secret_key,
        guards=Guards(breaker, RateLimiter("amplitude", 0), RetryBudget()),
        connect_timeout=1, read_timeout=2, max_bytes=100_000,
        observe=lambda *call: seen.append(call))
    client.properties("testUser", "").send()
    assert sandboxes.state("amplitude").calls == 1
    assert [(upstream, outcome) for upstream, outcome, _seconds in seen] == [("amplitude", "200")]
    breaker.failure()  # threshold 1: open
    with pytest.raises(CircuitOpen):
        client.properties("testUser", "").send()
    assert sandboxes.state("amplitude").calls == 1  # refused before any call


def test_upstream_calls_reach_the_app_metrics(app, sandboxes):
    client = app.test_client()
    assert client.get("/v1/amplitude/properties?user_id=testUser").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ccproxy_upstream_calls_total{outcome="200",upstream="amplitude"} 1.0' in text
