def test_readyz_reports_upstreams_and_cache(make_app, sandboxes):
    client = make_app(target_client_code="", target_url="", breaker_threshold=1, cache_max_stale=0).test_client()
    ready = client.get("/readyz").get_json()
    assert ready["ok"] is True and ready["degraded"] is False
    assert ready["cache"]["backend"] == "memory" and ready["cache"]["reachable"] is True
    assert ready["upstreams"]["amplitude"]["configured"] is True
    assert ready["upstreams"]["target"]["configured"] is False
    assert ready["upstreams"]["amplitude"]["limiter"]["per_minute"] == 600
    assert ready["upstreams"]["experiment"]["limiter"]["tokens"] is None  # no limit, and valid JSON
    assert b"Infinity" not in client.get("/readyz").data
    sandboxes.state("amplitude").set_fault("error", count=1)
    client.get("/v1/amplitude/properties?user_id=x")
    ready = client.get("/readyz").get_json()
    assert ready["upstreams"]["amplitude"]["breaker"] == "open" and ready["degraded"] is True


def test_healthz(client):
    assert client.get("/healthz").get_json() == {"ok": True}
