"""Braze snippets are safe to paste: pasted into the Liquid preview for two recipients, each
gets their own data; no preview value is ever in a snippet."""

from __future__ import annotations

import hashlib

import pytest

from proxy.snippets import BRAZE_MIN_CACHE, cache_max_age

HOST = "http://localhost"
# template -> (preview query, [(Braze attributes, the same recipient's query for /v1/render)] x 2)
CASES = {
    "recs_block": ("user_id=preview-user-1", [
        ({"user_id": "testUser"}, "user_id=testUser"),
        ({"user_id": "unknown-31"}, "user_id=unknown-31"),
    ]),
    "hero_banner": ("user_id=preview-user-2", [
        ({"user_id": "control-31"}, "user_id=control-31"),
        ({"user_id": "treatment-31"}, "user_id=treatment-31"),
    ]),
    "loyalty_badge": ("third_party_id=preview-visitor", [
        ({"user_id": "a1-mbox3rdPartyId"}, "third_party_id=a1-mbox3rdPartyId"),
        ({"user_id": "unknown-visitor-31"}, "third_party_id=unknown-visitor-31"),
    ]),
    "consent_footer": ("user_point_id=preview-point", [
        ({"custom_attribute": {"user_point_id": "up-31"}}, "user_point_id=up-31"),
        ({"custom_attribute.user_point_id": "optout-31"}, "user_point_id=optout-31"),
    ]),
}


def liquid(client, source, attributes):
    r = client.post("/v1/preview/liquid", json={"liquid": source, "attributes": attributes})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_snippet_yields_each_recipients_own_data(client, name):
    query, users = CASES[name]
    snippets = client.get(f"/v1/preview/render/{name}?{query}").get_json()["snippets"]
    preview_value = query.split("=")[1]
    for key in ("render_html", "render_text", "data"):
        assert preview_value not in snippets[key]
    outputs = []
    for attributes, own_query in users:
        expected = client.get(f"/v1/render/{name}?{own_query}").get_data(as_text=True)
        expected_text = client.get(f"/v1/render/{name}?{own_query}&format=text").get_data(as_text=True)
        assert liquid(client, snippets["render_html"], attributes)["output"] == expected
        assert liquid(client, snippets["render_text"], attributes)["output"] == expected_text
        data = liquid(client, snippets["data"], attributes)
        own_id = own_query.split("=")[1]
        assert all(own_id in call["url"] for call in data["calls"])
        assert all(call["status"] == 200 for call in data["calls"])
        outputs.append((expected, data["output"]))
    # The two recipients really differ, in the block and in the data snippet's Liquid.
    assert outputs[0][0] != outputs[1][0] and outputs[0][1] != outputs[1][1]


def test_email_hash_comes_from_the_operators_expression(client):
    snippets = client.get("/v1/preview/render/consent_footer?email_hash=demo-hash").get_json()["snippets"]
    assert "email_hash={{${email_address} | downcase | sha2 | url_param_escape}}" in snippets["render_html"]
    assert "demo-hash" not in str(snippets)
    assert any("CCPROXY_EMAIL_HASH_LIQUID" in note for note in snippets["notes"])
    for email in ("Camille@Example.com", "hugo@example.org"):
        digest = hashlib.sha256(email.lower().encode()).hexdigest()
        body = liquid(client, snippets["data"], {"email_address": email})
        assert body["calls"][0]["url"].startswith(f"{HOST}/v1/mediarithmics/choices?email_hash={digest}&")
        rendered = liquid(client, snippets["render_html"], {"email_address": email})["output"]
        assert rendered == client.get(f"/v1/render/consent_footer?email_hash={digest}").get_data(as_text=True)


def test_operator_sets_the_email_hash_expression(make_app):
    client = make_app(email_hash_liquid="{{custom_attribute.${md_hash}}}").test_client()
    snippets = client.get("/v1/preview/render/consent_footer?email_hash=x1").get_json()["snippets"]
    assert "email_hash={{custom_attribute.${md_hash} | url_param_escape}}" in snippets["data"]
    assert {"param": "email_hash", "expression": "{{custom_attribute.${md_hash}}}",
            "custom_attributes": ["md_hash"]} in snippets["attributes"]


def test_ids_without_a_braze_attribute_name_the_custom_attribute(client):
    snippets = client.get("/v1/preview/render/recs_block?device_id=dev-9").get_json()["snippets"]
    assert "device_id={{custom_attribute.${device_id} | url_param_escape}}" in snippets["render_html"]
    assert "dev-9" not in str(snippets)
    assert any("custom attribute `device_id`" in note for note in snippets["notes"])
    body = liquid(client, snippets["data"], {"custom_attribute": {"device_id": "a&b=c"}})
    # url_param_escape: a value can never add a parameter
    assert "device_id=a%26b%3Dc&" in body["calls"][0]["url"]


def test_basic_auth_when_keys_are_on(make_app):
    client = make_app(api_keys="k-123", braze_credential="proxy-cred").test_client()
    r = client.get("/v1/preview/render/recs_block?user_id=u", headers={"X-Api-Key": "k-123"})
    snippets = r.get_json()["snippets"]
    for key in ("render_html", "render_text", "data"):
        assert ":basic_auth proxy-cred" in snippets[key]
    assert "k-123" not in str(snippets)
    assert any("credential `proxy-cred`" in note for note in snippets["notes"])


def test_no_basic_auth_when_the_proxy_takes_no_keys(client):
    snippets = client.get("/v1/preview/render/recs_block?user_id=u").get_json()["snippets"]
    assert ":basic_auth" not in snippets["render_html"] + snippets["data"]


def test_cache_max_age_follows_the_ttl_and_braze_limits(make_app):
    client = make_app(cache_ttl_recommendations=3600).test_client()
    data = client.get("/v1/preview/render/recs_block?user_id=u").get_json()["snippets"]["data"]
    assert " :cache_max_age 3600 :save recs %}" in data


def test_data_tags_fall_back_instead_of_retrying_and_rendered_blocks_retry(client):
    """A saved answer's failure is the template's fallback (Braze sends the message); `:retry`
    would abort it after five more failing calls. A rendered block keeps `:retry`: its error
    would otherwise be printed into the email."""
    for name in ("recs_block", "hero_banner", "loyalty_badge", "consent_footer"):
        snippets = client.get(f"/v1/preview/render/{name}?user_id=u&third_party_id=t&email_hash=h").get_json()["snippets"]
        tags = [line for line in snippets["data"].splitlines() if line.startswith("{% connected_content")]
        assert tags and all(":save " in tag and ":retry" not in tag for tag in tags)
        assert " :retry :cache_max_age" in snippets["render_html"] and " :retry " in snippets["render_text"]
    hero = client.get("/v1/preview/render/hero_banner?user_id=u").get_json()["snippets"]
    # variants live 60 s in the proxy: Braze's 5-minute minimum, said in the snippet itself
    assert ":cache_max_age 300 :save exp" in hero["data"]
    assert "{% comment %} /v1/experiment/variants is fresh for 60 s" in hero["data"]
    assert any("at least 5 minutes" in note for note in hero["notes"])
    assert cache_max_age(10) == BRAZE_MIN_CACHE and cache_max_age(10**6) == 14400


def test_the_consent_snippet_reads_the_processing_it_asks_for(client):
    """A footer for processing 102 pasted as Liquid must say what the block says for 102,
    not what the recipient chose for 101 (the sandbox refuses 101 for `optout` ids)."""
    def block(point, processing):
        return client.get(f"/v1/render/consent_footer?user_point_id={point}&processing_id={processing}"
                          "&format=text").get_data(as_text=True)

    point = next(p for p in (f"optout-102-{i}" for i in range(50)) if "You receive" in block(p, "102"))
    assert "You receive" not in block(point, "101")
    snippets = client.get("/v1/preview/render/consent_footer?user_point_id=preview-point&processing_id=102"
                          ).get_json()["snippets"]
    data = liquid(client, snippets["data"], {"custom_attribute": {"user_point_id": point}})
    assert all("processing_id=102" in call["url"] for call in data["calls"])
    assert "You receive our newsletter" in data["output"]


def test_a_catalog_default_pasted_into_a_snippet_is_pointed_out(client):
    notes = client.get("/v1/preview/render/recs_block?user_id=u1").get_json()["snippets"]["notes"]
    assert any(note.startswith("`rec_id=testRecId` is the template's default") for note in notes)
    own = client.get("/v1/preview/render/recs_block?user_id=u1&rec_id=myModel").get_json()["snippets"]["notes"]
    assert not any("rec_id" in note for note in own)
