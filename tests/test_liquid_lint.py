"""The Liquid linter through POST /v1/preview/liquid: for each warning code, a message that
misrenders (what the preview, which renders as Braze does, shows) and its corrected form,
which renders right and lints clean."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.liquid_lint import lint

README = Path(__file__).resolve().parent.parent / "README.md"

HOST = "http://localhost"  # the test client's host: the proxy itself


def preview(client, liquid, **attributes):
    answer = client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": attributes})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def codes(body):
    return [w["code"] for w in body["warnings"]]


def cc(path_and_query: str, save: str | None = None) -> str:
    return f"{{% connected_content {HOST}{path_and_query}" + (f" :save {save}" if save else "") + " %}"


VARIANTS = cc("/v1/experiment/variants?user_id={{${user_id}}}&flag_keys=checkout-button", "exp")
RECS = cc("/v1/amplitude/recommendations?user_id={{${user_id}}}&rec_id=testRecId", "recs")
TARGET = cc("/v1/adobe-target/profile?third_party_id={{${user_id}}}", "target")
PROPERTIES = cc("/v1/amplitude/properties?user_id={{${user_id}}}", "amp")


def test_hyphenated_key(client):
    broken = VARIANTS + '\n{% if exp.variants.checkout-button == "treatment" %}Buy now{% else %}Checkout{% endif %}'
    body = preview(client, broken, user_id="treatment-1")
    assert body["output"].strip() == "Checkout"  # the treatment never shows
    assert body["warnings"] == [{"line": 2, "code": "hyphenated_key", "message": (
        "exp.variants.checkout-button: the proxy's keys never contain '-' (Braze reads the key "
        "'checkout-button' and renders nothing); write exp.variants.checkout_button")}]
    fixed = broken.replace("checkout-button ==", "checkout_button ==")
    body = preview(client, fixed, user_id="treatment-1")
    assert body["output"].strip() == "Buy now" and body["warnings"] == []


COHORTS = "/v1/amplitude/cohorts?user_id={{${user_id}}}&cohort_id=cohort3"
OTHER_HOST = "{% connected_content https://api.other.example/v1/amplitude/properties?user_id={{${user_id}}} :save amp %}"
RELATIVE = "{% connected_content /v1/amplitude/properties?user_id={{${user_id}}} :save amp %}"
# code, user, broken message, what it renders, a part of the warning, corrected message, what that renders
MISRENDERS = [
    ("unknown_field", "testUser", RECS + "{% if recs.found %}Top pick: {{recs.first_item}}{% endif %}", "Top pick: ",
     "has no field 'first_item'", RECS + "{% if recs.found %}Top pick: {{recs.item_1}}{% endif %}", "Top pick: cookie"),
    # an open map: checked against what the upstream answered for this user
    ("unknown_field", "testUser", PROPERTIES + "Library: {{amp.properties.libary}}", "Library: ",
     "amp.properties.libary: not in the answer", PROPERTIES + "Library: {{amp.properties.library}}",
     "Library: http/1.0"),
    ("string_number_comparison", "a1-mbox3rdPartyId",
     TARGET + "{% if target.profile.user_points > 2000 %}Free pastry!{% endif %}",
     "Liquid error: comparison of String with 2000 failed", "target.numbers.user_points",
     TARGET + "{% if target.numbers.user_points > 2000 %}Free pastry!{% endif %}", "Free pastry!"),
    ("string_number_comparison", "testUser",
     RECS + '{% if recs.found %}{% if recs.item_count == "5" %}five{% else %}not five{% endif %}{% endif %}',
     "not five", "never true", RECS + "{% if recs.found %}{% if recs.item_count == 5 %}five{% else %}not five"
     "{% endif %}{% endif %}", "five"),
    # the raw JSON lands in the message
    ("connected_content_no_save", "testUser", cc(COHORTS) + "{{member}}", '{"ok": true', "has no :save",
     cc(COHORTS, "c") + "{{c.member}}", "true"),
    # refused here, and not the proxy's flat JSON in Braze
    ("connected_content_other_host", "testUser", OTHER_HOST + "[{{amp.properties.library}}]", "[]",
     "api.other.example, not this proxy", PROPERTIES + "[{{amp.properties.library}}]", "[http/1.0]"),
    # works here only; Braze cannot call a relative URL at all
    ("connected_content_relative_url", "testUser", RELATIVE + "{{amp.found}}", "true", "Braze needs the full URL",
     PROPERTIES + "{{amp.found}}", "true"),
]


@pytest.mark.parametrize("code, user, broken, rendered, says, fixed, fixed_renders", MISRENDERS,
                         ids=[f"{case[0]}-{n}" for n, case in enumerate(MISRENDERS)])
def test_misrendering_message_warns_and_its_correction_lints_clean(client, code, user, broken, rendered, says,
                                                                   fixed, fixed_renders):
    body = preview(client, broken, user_id=user)
    assert body["output"].startswith(rendered)
    assert codes(body) == [code] and says in body["warnings"][0]["message"]
    body = preview(client, fixed, user_id=user)
    assert body["output"] == fixed_renders and body["warnings"] == []


def test_a_rendered_block_needs_no_save(client):
    body = preview(client, cc("/v1/render/recs_block?user_id={{${user_id}}}&format=text"), user_id="testUser")
    assert "cookie" in body["output"] and body["warnings"] == []


def test_missing_found_guard(client):
    broken = RECS + "\nPicked for you: {{recs.item_1}}."
    body = preview(client, broken, user_id="unknown-3")
    assert body["output"].strip() == "Picked for you: ."
    assert body["warnings"][0]["line"] == 2 and codes(body) == ["missing_found_guard"]
    fixed = RECS + "\n{% if recs.found %}Picked for you: {{recs.item_1}}.{% else %}Our favourites.{% endif %}"
    body = preview(client, fixed, user_id="unknown-3")
    assert body["output"].strip() == "Our favourites." and body["warnings"] == []
    aborts_first = RECS + '{% if recs.found == false %}{% abort_message("none") %}{% endif %}{{recs.item_1}}'
    assert preview(client, aborts_first, user_id="testUser")["warnings"] == []
    guarded_by_count = RECS + "{% if recs.item_count > 0 %}{{recs.item_1}}{% endif %}"
    assert preview(client, guarded_by_count, user_id="testUser")["warnings"] == []


def test_assigned_and_loop_variables_are_not_guessed_at(client):
    liquid = (RECS + '{% assign flag = "x-y" %}{% for item in recs.items %}{{item}} {% endfor %}'
              "{% assign first = recs.items | first %}{{first}}")
    body = preview(client, liquid, user_id="testUser")
    assert body["output"].startswith("cookie cracker") and body["warnings"] == []


@pytest.mark.parametrize("name", ["recs_block", "hero_banner", "loyalty_badge", "consent_footer"])
def test_the_catalogs_liquid_lints_clean(app, name):
    """The template library's own Liquid has no warning, its data saved as the catalog says."""
    template = app.extensions["ccproxy_templates"].get(name)
    saves = "".join(f"{{% connected_content https://proxy.example.com{path}?user_id={{{{${{user_id}}}}}} :save {data} %}}"
                    for data, path in template.data.items())
    assert lint(saves + template.liquid, {}, {"proxy.example.com"}) == []


def test_every_liquid_example_in_the_readme_lints_clean():
    blocks = re.findall(r"```liquid\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 7
    for block in blocks:
        assert lint(block, {}, {"proxy.example.com"}) == [], block


@pytest.mark.parametrize("name", ["recs_block", "hero_banner", "loyalty_badge", "consent_footer"])
def test_the_preview_pages_snippets_lint_clean(make_app, name):
    client = make_app(public_url="https://proxy.example.com").test_client()
    snippets = client.get(f"/v1/preview/render/{name}?user_id=u1&third_party_id=t1&email_hash=h1").get_json()["snippets"]
    pasted = [v for v in snippets.values() if isinstance(v, str) and "connected_content" in v]
    assert len(pasted) >= 2
    for snippet in pasted:
        assert lint(snippet, {}, {"proxy.example.com"}) == [], snippet


def test_warnings_carry_the_line_of_the_braze_source():
    source = ("{% connected_content https://p.example/v1/amplitude/recommendations?user_id={{${user_id}}}&rec_id=a"
              " :save recs %}\n{{${first_name}}}\n\n{{recs.item_2}}")
    assert lint(source, {}, {"p.example"}) == [{"line": 4, "code": "missing_found_guard", "message": (
        "recs.item_2 is read without a guard: for a user the upstream does not know it renders empty; "
        "wrap it in {% if recs.found %}…{% else %}<fallback>{% endif %}")}]


FRAGMENTS = [
    RECS, VARIANTS, TARGET, PROPERTIES, "{{recs.item_1}}", "{% if recs.found %}", "{% endif %}", "{{ recs[x].y }}",
    "{{recs.items[0].size}}", "{{exp.variants.checkout-button}}", "{% for i in recs.items %}{{i}}{% endfor %}",
    "{% if target.profile.user_points > 2000 %}x{% endif %}", "{{amp.properties.a.b.c}}", "{% assign z = 1 %}",
    "{% include 'nope' %}", "{% connected_content https://{{h}}/x :save q %}", "{{ content_blocks.${shop_signature} }}",
    "{% unless recs.found %}{% abort_message() %}{% endunless %}", "{{${first_name}}}", "\n", "{{ recs.__http_status_code__ }}",
    "{% case exp.found %}{% when 1 %}{{recs.item_2}}{% endcase %}", "{{ custom_attribute.${a b} }}",
]


def test_the_linter_never_fails_on_a_message_that_parses():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from liquid.exceptions import LiquidError

    from proxy.liquid_preview import PreviewEnvironment, braze_to_liquid

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(FRAGMENTS), max_size=8))
    def check(parts):
        source = "".join(parts)
        try:
            PreviewEnvironment().from_string(braze_to_liquid(source.replace("{{ content_blocks.${shop_signature} }}", "")))
        except LiquidError:
            return  # the preview answers 422 before linting
        fetched = {"/v1/amplitude/properties": [{"properties": {"a": {"b": 1}}}]}
        for warning in lint(source, fetched, {"localhost"}):
            assert set(warning) == {"line", "code", "message"} and warning["line"] >= 1

    check()
