"""Experiment variants end to end against the sandbox Evaluation API."""

import pytest
from conftest import upstream_calls

URL = "/v1/experiment/variants"


def test_variants_and_payloads(client):
    body = client.get(f"{URL}?user_id=treatment-7&flag_keys=checkout-button,hero-banner,unknown-flag").get_json()
    assert body["variants"] == {"checkout_button": "treatment", "hero_banner": "summer-sale", "unknown_flag": "off"}
    assert body["payloads"]["checkout_button"] == {"color": "#1a7f37", "label_text": "Buy now"}
    assert body["payloads"]["hero_banner"]["cta_url"] == "https://shop.example.com/summer"


def test_outsider_empty_answer_reads_off(client):
    body = client.get(f"{URL}?user_id=outsider-1&flag_keys=checkout-button").get_json()
    assert body["variants"] == {"checkout_button": "off"} and body["found"] is False


def test_user_properties_shortcut_merges_into_context(client):
    plain = client.get(f"{URL}?user_id=u5&flag_keys=premium-upsell").get_json()
    assert plain["variants"]["premium_upsell"] == "off"
    merged = client.get(
        f'{URL}?user_id=u5&flag_keys=premium-upsell&context={{"user_properties":{{"plan":"x"}}}}'
        "&user_properties.premium=true"
    ).get_json()
    assert merged["variants"]["premium_upsell"] == "on"
    assert merged["payloads"]["premium_upsell"] == {"discount_percent": 15}


def test_invalid_context_is_400_before_any_upstream_call(client, sandboxes):
    for bad in ("{nope", "[1,2]"):
        r = client.get(f"{URL}?user_id=u&context={bad}")
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_json"
    assert upstream_calls(sandboxes, "experiment") == 0


def test_track_false_sends_no_track_and_never_shares_cache(client, sandboxes):
    state = sandboxes.state("experiment")
    untracked = client.get(f"{URL}?user_id=u6&flag_keys=checkout-button&track=false")
    assert untracked.get_json()["tracked"] is False
    assert state.counters["assignments_tracked"] == 0
    tracked = client.get(f"{URL}?user_id=u6&flag_keys=checkout-button")
    assert tracked.headers["X-Cache"] == "MISS" and tracked.get_json()["tracked"] is True
    assert state.counters["assignments_tracked"] == 1
    assert client.get(f"{URL}?user_id=u6&flag_keys=checkout-button&track=false").headers["X-Cache"] == "HIT"
    assert upstream_calls(sandboxes, "experiment") == 2


def test_flag_order_shares_cache(client, sandboxes):
    client.get(f"{URL}?user_id=u7&flag_keys=a,b")
    assert client.get(f"{URL}?user_id=u7&flag_keys=b,a").headers["X-Cache"] == "HIT"


def test_wrong_deployment_key_is_502(make_app):
    r = make_app(experiment_deployment_key="wrong").test_client().get(f"{URL}?user_id=u")
    assert r.status_code == 502 and r.get_json()["error"]["code"] == "upstream_auth_failed"


def test_not_configured_is_a_named_503(make_app):
    r = make_app(experiment_deployment_key="").test_client().get(f"{URL}?user_id=u")
    assert r.status_code == 503
    assert "CCPROXY_EXPERIMENT_DEPLOYMENT_KEY" in r.get_json()["error"]["message"]


@pytest.mark.parametrize("region, url", [("us", "https://api.lab.amplitude.com"), ("eu", "https://api.lab.eu.amplitude.com")])
def test_region_urls(make_app, region, url):
    services = make_app(experiment_url="", experiment_region=region).extensions["ccproxy"]
    assert services.experiment.base_url == url


def test_hero_images_are_served_by_the_sandbox_itself(client, sandboxes):
    """The hero payloads point at the sandbox's own images, so previews need no internet."""
    import requests

    experiment = sandboxes.servers["experiment"].url
    body = client.get("/v1/experiment/variants?user_id=u-img&flag_keys=hero-banner&track=false").get_json()
    image_url = body["payloads"]["hero_banner"]["image_url"]
    assert image_url.startswith(experiment + "/images/")
    image = requests.get(image_url, timeout=10)
    assert image.status_code == 200 and image.headers["Content-Type"].startswith("image/svg+xml")
    assert body["payloads"]["hero_banner"]["headline"] in image.text
    assert requests.get(f"{experiment}/images/nope.svg", timeout=10).status_code == 404
    # an image load is not an API call: never counted, never faulted
    assert upstream_calls(sandboxes, "experiment") == 1
