"""Braze Liquid parity in POST /v1/preview/liquid: Braze's filters, attribute namespaces,
content blocks, connected_content options, and render errors as Ruby Liquid prints them
(Debian's ruby-liquid, Shopify's engine, is the oracle)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
RUBY = shutil.which("ruby")


def preview(client, liquid, **attributes):
    r = client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": attributes})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def ruby_liquid(source: str) -> str:
    assert RUBY, "ruby and ruby-liquid are not installed: run the README's test command (bash scripts/test)"
    done = subprocess.run([RUBY, "-e", 'require "liquid"; print Liquid::Template.parse(STDIN.read).render({})'],
                          input=source, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_hash_and_hmac_filters(client):
    out = preview(client, "{{'Abc' | md5}}|{{'Abc' | sha1}}|{{'Abc' | sha2}}|{{'Abc' | base64_encode}}|"
                          "{{'msg' | hmac_sha1_hex: 'k'}}|{{'msg' | hmac_sha1_base64: 'k'}}|"
                          "{{'msg' | hmac_sha256_hex: 'k'}}|{{'msg' | hmac_sha256_base64: 'k'}}")["output"]
    mac1, mac256 = (hmac.new(b"k", b"msg", name).digest() for name in ("sha1", "sha256"))
    assert out.split("|") == [
        hashlib.md5(b"Abc").hexdigest(), hashlib.sha1(b"Abc").hexdigest(), hashlib.sha256(b"Abc").hexdigest(),
        base64.b64encode(b"Abc").decode(), mac1.hex(), base64.b64encode(mac1).decode(),
        mac256.hex(), base64.b64encode(mac256).decode(),
    ]


def test_escaping_json_and_number_filters(client):
    out = preview(client, "{{'a b&c=d/e?' | url_escape}}|{{'a b&c=d/e?' | url_param_escape}}|"
                          "{{'say \"hi\"' | json_escape}}|{{1234567.5 | number_with_delimiter}}|"
                          "{{ -9876543 | number_with_delimiter}}|"
                          "{% assign o = '{\"a\": {\"b-c\": [1, 2]}}' | json_parse %}{{o.a | property_accessor: 'b-c' | last}}|"
                          "{{o | as_json_string}}")["output"]
    assert out.split("|") == ["a%20b&c=d/e?", "a%20b%26c%3Dd%2Fe%3F", 'say \\"hi\\"', "1,234,567.5",
                              "-9,876,543", "2", '{"a":{"b-c":[1,2]}}']


def test_dates_epoch_seconds_and_time_zones(client):
    out = preview(client, "{{'2025-01-10T10:20:00Z' | date: '%s'}}|"
                          "{{'2025-01-10T10:20:00Z' | time_zone: 'America/New_York' | date: '%Y-%m-%d %H:%M'}}|"
                          "{{${time_zone}}}|{{'now' | date: '%Y'}}", time_zone="Europe/Paris")["output"]
    stamp, local, zone, year = out.split("|")
    assert stamp == "1736504400" and local == "2025-01-10 05:20" and zone == "Europe/Paris"
    assert re.fullmatch(r"20\d\d", year)
    r = client.post("/v1/preview/liquid", json={"liquid": "{{'now' | time_zone: 'Mars/Base'}}"})
    assert "unknown time zone" in r.get_json()["output"]


def test_attribute_namespaces(client):
    liquid = ("{{${first_name}}} {{${email_address}}} {{${language}}} {{custom_attribute.${Loyalty Tier}}} "
              "{{event_properties.${basket}}} {{canvas_entry_properties.${offer}}} "
              "{{campaign.${dispatch_id}}} {{campaign.${name}}}")
    body = client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": {
        "first_name": "Camille", "email_address": "c@example.com", "language": "fr",
        "custom_attribute": {"Loyalty Tier": "gold"}, "event_properties.basket": "3 items",
        "canvas_entry_properties": {"offer": "SPRING"}, "campaign": {"dispatch_id": "d-1", "name": "Spring"},
    }}).get_json()
    assert body["output"] == "Camille c@example.com fr gold 3 items SPRING d-1 Spring"


def test_every_braze_namespace_and_plain_text_left_as_it_is(client):
    """`api_trigger_properties`, `canvas` and `context` read what the preview is given (they
    rendered empty); `${first_name}` in plain text is not Liquid, and Braze prints it as is."""
    liquid = ("Code: [{{api_trigger_properties.${coupon}}}] Canvas: [{{canvas.${name}}}] "
              "Ctx: [{{context.${offer}}}] {% if subscribed_state.${email_global} == 'opted_in' %}in{% endif %} "
              "Reply with ${first_name}")
    body = client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": {
        "first_name": "Camille", "api_trigger_properties": {"coupon": "C-10"}, "canvas.name": "Spring",
        "context": {"offer": "SPRING"}, "subscribed_state": {"email_global": "opted_in"},
    }}).get_json()
    assert body["output"] == "Code: [C-10] Canvas: [Spring] Ctx: [SPRING] in Reply with ${first_name}"


def test_content_blocks_from_the_templates_folder(client, make_app, tmp_path):
    out = preview(client, "[{{content_blocks.${shop_signature}}}]", first_name="Hugo")["output"]
    assert out == "[See you soon at Boulangerie Example, Hugo!\n]"
    (tmp_path / "content_blocks").mkdir()
    (tmp_path / "catalog.toml").write_text("")
    (tmp_path / "content_blocks" / "outer.liquid").write_text("<{{content_blocks.${inner}}}>")
    (tmp_path / "content_blocks" / "inner.liquid").write_text("{{${user_id}}}")
    (tmp_path / "content_blocks" / "loop.liquid").write_text("{{content_blocks.${loop}}}")
    other = make_app(templates_dir=str(tmp_path)).test_client()
    assert preview(other, "{{content_blocks.${outer}}}", user_id="u7")["output"] == "<u7>"
    for name in ("loop", "missing", "../catalog"):
        r = other.post("/v1/preview/liquid", json={"liquid": f"{{{{content_blocks.${{{name}}}}}}}"})
        assert r.status_code == 422 and r.get_json()["error"]["code"] == "liquid_error"


def test_connected_content_options(client):
    liquid = ('{% connected_content /v1/amplitude/recommendations?user_id={{${user_id}}}&rec_id=r1 '
              ':basic_auth ccproxy :headers {"X-Trace": "a b"} :cache_max_age 900 :retry '
              ':content_type application/json :save recs %}{{recs.__http_status_code__}} {{recs.ok}}')
    body = preview(client, liquid, user_id="testUser")
    assert body["output"] == "200 true"
    assert body["calls"][0]["options"] == {"basic_auth": "ccproxy", "headers": {"X-Trace": "a b"},
                                           "cache_max_age": "900", "retry": True,
                                           "content_type": "application/json", "save": "recs"}
    assert "problems" not in body["calls"][0]
    bad = preview(client, "{% connected_content /v1/amplitude/profile?user_id=u :sav x :cache_max_age soon %}")
    assert bad["calls"][0]["problems"] == ["unknown option :sav", ":cache_max_age takes seconds"]


def test_retry_then_abort_on_server_errors(client, sandboxes):
    sandboxes.state("amplitude").set_fault("error")
    base = "{% connected_content /v1/amplitude/recommendations?user_id=u5&rec_id=r1"
    body = preview(client, base + " :retry :save recs %}Hello {{recs.item_1}}")
    assert body["aborted"] is True and "503" in body["abort_reason"]
    # without :retry Braze goes on with what it got (the proxy's JSON error)
    body = preview(client, base + " :save recs %}Hello [{{recs.item_1}}]")
    assert body["aborted"] is False and body["output"] == "Hello []"


@pytest.mark.parametrize("source", [
    'a{% if "2450" > 2000 %}y{% endif %}b',
    'a{% if 2000 < "2450" %}y{% endif %}b',
    'x{% for i in (1..2) %}{% if "a" > 1.5 %}q{% endif %}{{i}}{% endfor %}z',
    '{% assign n = "7" %}{% if n < 10 %}small{% else %}big{% endif %}!',
    '{{ "a,b" | split: "," | join: "-" }} {{ 3 | plus: 4 }} {{ "x" | append: "y" | upcase }}',
])
def test_render_errors_and_standard_liquid_match_ruby_liquid(client, source):
    assert preview(client, source)["output"] == ruby_liquid(source)


def test_the_readme_braze_message_previews_as_braze_renders_it(make_app):
    text = README.read_text()
    block = text.split("<!-- braze-message:start -->")[1].split("<!-- braze-message:end -->")[0]
    message = block.split("```liquid\n")[1].split("```")[0]
    client = make_app(public_url="https://proxy.example.com").test_client()
    body = preview(client, message, user_id="treatment-7", first_name="Camille", email_address="Camille@Example.com")
    digest = hashlib.sha256(b"camille@example.com").hexdigest()
    assert body["aborted"] is False
    assert f"email_hash={digest}&processing_id=101" in body["calls"][1]["url"]
    lines = [line for line in body["output"].splitlines() if line.strip()]
    assert lines == ["Hi Camille! Summer sale: up to 40% off", "Newsletter: subscribed",
                     "See you soon at Boulangerie Example, Camille!"]
    outsider = preview(client, message, user_id="outsider-3", email_address="x@example.com")
    assert outsider["aborted"] is True and outsider["abort_reason"] == "no hero banner for this user"
