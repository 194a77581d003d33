"""Message templates: listing, rendering per template (found / not found / fallback), errors."""

import pytest
from conftest import upstream_calls


def test_listing_describes_every_template(client):
    body = client.get("/v1/templates").get_json()
    names = {t["name"]: t for t in body["templates"]}
    assert set(names) >= {"recs_block", "hero_banner", "loyalty_badge", "consent_footer"}
    for t in names.values():
        assert t["formats"] == ["html", "text"] and t["description"] and t["params"]
    assert "rec_id" in names["recs_block"]["params"]


def test_recs_block_found_and_fallback(client):
    found = client.get("/v1/render/recs_block?user_id=testUser&rec_id=testRecId")
    assert found.status_code == 200 and found.mimetype == "text/html"
    html = found.get_data(as_text=True)
    assert "cookie" in html and "croissant" in html and "<table" in html and 'style="' in html
    text = client.get("/v1/render/recs_block?user_id=unknown-1&format=text")
    assert text.mimetype == "text/plain"
    assert text.get_data(as_text=True).splitlines()[:4] == [
        "Customer favourites this week", "1. Classic croissant", "2. Sourdough loaf", "3. Almond financier",
    ]


def test_render_shares_the_json_cache(client, sandboxes):
    client.get("/v1/amplitude/recommendations?user_id=alice&rec_id=testRecId")
    r = client.get("/v1/render/recs_block?user_id=alice&rec_id=testRecId")
    assert r.headers["X-Cache"] == "HIT" and upstream_calls(sandboxes) == 1


def test_upstream_failure_renders_the_fallback(client, sandboxes):
    sandboxes.state("amplitude").set_fault("error", count=1)
    r = client.get("/v1/render/recs_block?user_id=bob&format=text")
    assert r.status_code == 200 and "Customer favourites this week" in r.get_data(as_text=True)


def test_hero_banner_control_treatment_and_outsider(client, sandboxes):
    control = client.get("/v1/render/hero_banner?user_id=control-1&format=text").get_data(as_text=True)
    treatment = client.get("/v1/render/hero_banner?user_id=treatment-1").get_data(as_text=True)
    outsider = client.get("/v1/render/hero_banner?user_id=outsider-1&format=text").get_data(as_text=True)
    assert control.startswith("Spring picks are in")
    assert "Summer sale: up to 40% off" in treatment and 'data-variant="summer-sale"' in treatment
    assert outsider.startswith("New season, new favourites")


def test_loyalty_badge(client):
    gold = client.get("/v1/render/loyalty_badge?third_party_id=a1-mbox3rdPartyId&format=text")
    assert gold.get_data(as_text=True).strip() == "GOLD MEMBER - 2450 points to spend"
    html = client.get("/v1/render/loyalty_badge?tntid=unknown-1").get_data(as_text=True)
    assert "Join our loyalty club" in html


def test_consent_footer(client):
    subscribed = client.get("/v1/render/consent_footer?email_hash=h1&format=text").get_data(as_text=True)
    refused = client.get("/v1/render/consent_footer?email_hash=optout-1&format=text").get_data(as_text=True)
    assert subscribed.startswith("You receive this newsletter")
    assert refused.startswith("You are not subscribed")


def test_html_values_are_escaped(client):
    html = client.get("/v1/render/loyalty_badge?third_party_id=<script>x</script>").get_data(as_text=True)
    assert "<script>" not in html


@pytest.mark.parametrize("name", ["nope", "..%2Fsetup.cfg", "catalog", "recs_block.html"])
def test_unknown_templates_are_404_json(client, name):
    r = client.get(f"/v1/render/{name}?user_id=u")
    assert r.status_code == 404 and r.get_json()["ok"] is False


def test_bad_format_and_missing_user(client):
    assert client.get("/v1/render/recs_block?user_id=u&format=pdf").status_code == 400
    r = client.get("/v1/render/recs_block")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "missing_parameter"


def test_template_errors_name_file_and_line(make_app, tmp_path):
    (tmp_path / "catalog.toml").write_text(
        '[broken]\ndescription = "x"\nparams = ["user_id"]\n'
        '[crashes]\ndescription = "y"\nparams = ["user_id"]\n'
    )
    (tmp_path / "broken.html").write_text("ok\n{% if %}\n")
    (tmp_path / "crashes.html").write_text("line one\n{{ 1 // 0 }}\n")
    client = make_app(templates_dir=str(tmp_path)).test_client()
    r = client.get("/v1/render/broken?user_id=u")
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "template_error" and error["template"] == "broken.html" and error["line"] == 2
    r = client.get("/v1/render/crashes?user_id=u")
    assert r.status_code == 422 and r.get_json()["error"]["line"] == 2
    assert "Traceback" not in r.get_data(as_text=True)
    assert client.get("/v1/render/crashes?user_id=u&format=text").status_code == 404


def test_an_error_in_an_included_file_names_that_file(make_app, tmp_path):
    (tmp_path / "catalog.toml").write_text(
        '[outer]\ndescription = "x"\nparams = ["user_id"]\n'
        '[broken_include]\ndescription = "y"\nparams = ["user_id"]\n'
        '[lost_include]\ndescription = "z"\nparams = ["user_id"]\n')
    (tmp_path / "outer.html").write_text("one\n{% include 'partial.html' %}\n")
    (tmp_path / "partial.html").write_text("a\nb\nc\nd\n{{ 1 // 0 }}\n")
    (tmp_path / "broken_include.html").write_text("{% include 'syntax.html' %}\n")
    (tmp_path / "syntax.html").write_text("x\n{% if %}\n")
    (tmp_path / "lost_include.html").write_text("x\n{% include 'gone.html' %}\n")
    client = make_app(templates_dir=str(tmp_path)).test_client()
    error = client.get("/v1/render/outer?user_id=u").get_json()["error"]
    assert (error["code"], error["template"], error["line"]) == ("template_error", "partial.html", 5)
    error = client.get("/v1/render/broken_include?user_id=u").get_json()["error"]
    assert (error["template"], error["line"]) == ("syntax.html", 2)
    r = client.get("/v1/render/lost_include?user_id=u")
    assert r.status_code == 422 and r.get_json()["error"]["template"] == "lost_include.html"
    assert "includes gone.html, which is missing" in r.get_json()["error"]["message"]


def test_preview_render_never_tracks(client, sandboxes):
    body = client.get("/v1/preview/render/hero_banner?user_id=treatment-2").get_json()
    assert body["calls"]["exp"]["body"]["tracked"] is False
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 0
    assert ("/v1/render/hero_banner?user_id={{${user_id} | url_param_escape}}&flag_keys=hero-banner"
            in body["snippets"]["render_html"])
    assert ":save exp %}" in body["snippets"]["data"]


def test_every_template_file_is_installed_with_the_package():
    """setup.cfg lists the template files for regular installs: none may be forgotten."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = {line.strip() for line in (root / "setup.cfg").read_text().splitlines()
              if line.strip().startswith("templates/")}
    on_disk = {p.relative_to(root).as_posix() for p in (root / "templates").rglob("*") if p.is_file()}
    assert listed == on_disk


def test_a_template_cannot_change_the_answers_it_is_given(make_app, tmp_path):
    """Rendered values are the cache's own lists and mappings, shared with every later
    answer: a template that tries to change one is a template error, and nothing changes."""
    (tmp_path / "catalog.toml").write_text(
        '[grows]\ndescription = "x"\nparams = ["user_id"]\ndata = { recs = "/v1/amplitude/recommendations" }\n'
        'defaults = { rec_id = "testRecId" }\n')
    (tmp_path / "grows.html").write_text('{{ recs["items"].append("injected") }}{{ recs.update(ok=false) }}\n')
    client = make_app(templates_dir=str(tmp_path)).test_client()
    sent = client.get("/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId").get_json()
    r = client.get("/v1/render/grows?user_id=testUser")
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "template_error"
    assert "unsafe" in r.get_json()["error"]["message"]
    again = client.get("/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId")
    assert again.headers["X-Cache"] == "HIT" and again.get_json() == sent
    with client.application.test_request_context():  # the in-process form, shaped again
        from proxy.endpoints import call
        done = call(client.application.extensions["ccproxy"], "/v1/amplitude/recommendations",
                    {"user_id": "testUser", "rec_id": "testRecId"})
    assert "injected" not in done.body["items"]
