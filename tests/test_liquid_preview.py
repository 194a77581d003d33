"""POST /v1/preview/liquid: Braze Liquid rendered with python-liquid against the proxy itself."""

from conftest import upstream_calls

HOST = "http://localhost"


def preview(client, liquid, **attributes):
    return client.post("/v1/preview/liquid", json={"liquid": liquid, "attributes": attributes})


def test_connected_content_save_and_use(client):
    liquid = (
        f"{{% connected_content {HOST}/v1/amplitude/recommendations?user_id={{{{${{user_id}}}}}}&rec_id=testRecId :save recs %}}"
        "Hi {{${first_name} | default: 'there'}}: {{recs.item_1}} ({{recs.__http_status_code__}})"
    )
    body = preview(client, liquid, user_id="testUser").get_json()
    assert body["ok"] and body["aborted"] is False and body["abort_reason"] is None
    assert body["output"] == "Hi there: cookie (200)"
    call = body["calls"][0]
    assert call["url"].endswith("user_id=testUser&rec_id=testRecId") and call["status"] == 200
    assert call["cache"] in ("HIT", "MISS") and call["ms"] >= 0


def test_abort_message(client):
    liquid = (
        "{% connected_content /v1/amplitude/recommendations?user_id={{${user_id}}}&rec_id=r :save recs %}"
        '{% if recs.found == false %}{% abort_message("no recs for this user") %}{% endif %}Hello'
    )
    body = preview(client, liquid, user_id="unknown-9").get_json()
    assert body["aborted"] is True and body["abort_reason"] == "no recs for this user"
    assert preview(client, liquid, user_id="testUser").get_json()["output"] == "Hello"


def test_outside_urls_are_refused_without_a_request(client, sandboxes):
    for url in ("http://169.254.169.254/latest/meta-data", "https://evil.example/v1/amplitude/profile?user_id=x",
                "file:///etc/passwd"):
        body = preview(client, f"{{% connected_content {url} :save x %}}[{{{{x.ok}}}}]").get_json()
        assert body["output"] == "[]"
        assert "refused" in body["calls"][0]
    assert upstream_calls(sandboxes) == 0


def test_render_endpoint_inserted_as_text_and_never_tracks(client, sandboxes):
    body = preview(client, "{% connected_content /v1/render/hero_banner?user_id=treatment-4&format=text %}").get_json()
    assert body["output"].startswith("Summer sale: up to 40% off")
    assert sandboxes.state("experiment").counters["assignments_tracked"] == 0


def test_unknown_proxy_path_is_a_404_rendering_empty(client):
    body = preview(client, "[{% connected_content /v1/nothing-here %}]").get_json()
    assert body["output"] == "[]" and body["calls"][0]["status"] == 404


def test_post_is_refused_previews_never_write(client):
    body = preview(client, "{% connected_content /v1/amplitude/profile?user_id=u :method post :save x %}").get_json()
    assert "never write" in body["calls"][0]["refused"]


def test_braze_filters(client):
    body = preview(client, "{{ 'a b&c' | url_param_escape }} {{ 'say \"hi\"' | json_escape }}").get_json()
    assert body["output"] == 'a%20b%26c say \\"hi\\"'


def test_bad_liquid_and_bad_body(client):
    r = preview(client, "{% if %}")
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "liquid_error"
    r = client.post("/v1/preview/liquid", data="nope", content_type="text/plain")
    assert r.status_code == 400 and r.get_json()["ok"] is False


def test_numbers_compare_as_numbers_in_liquid(client):
    liquid = ("{% connected_content /v1/adobe-target/profile?third_party_id={{${user_id}}} :save target %}"
              "{% if target.numbers.user_points > 2000 %}big{% else %}small{% endif %} {{target.modified_at}}")
    body = preview(client, liquid, user_id="a1-mbox3rdPartyId").get_json()
    assert body["output"] == "big 2025-01-10T10:20:00Z"
    liquid = ("{% connected_content /v1/mediarithmics/choices?email_hash=x&processing_id=107 :save c %}"
              "{% if c.choices.processing_107 == false %}off{% endif %} {{c.unrecorded | join: ','}}")
    assert preview(client, liquid).get_json()["output"] == "off 107"


def test_a_preview_makes_at_most_its_cap_of_connected_content_calls(make_app, sandboxes):
    """A loop around a call would spend the upstream budget recipients need: past the cap
    the preview stops with a named limit and calls nothing more."""
    client = make_app(preview_max_calls=5).test_client()
    loop = ("{% for i in (1..3000) %}{% connected_content /v1/amplitude/recommendations?"
            "user_id=cap-{{i}}&rec_id=testRecId :save r %}{% endfor %}done")
    r = preview(client, loop)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "liquid_limit"
    assert r.get_json()["error"]["message"].startswith("connected_content_limit: the message makes more than 5 ")
    assert upstream_calls(sandboxes) == 5
    five = ("{% for i in (1..5) %}{% connected_content /v1/amplitude/recommendations?"
            "user_id=cap-{{i}}&rec_id=testRecId :save r %}{{r.item_1}} {% endfor %}")
    assert len(preview(client, five).get_json()["output"].split()) == 5
    assert upstream_calls(sandboxes) == 5  # the five the stopped preview cached


def test_a_filter_python_refuses_shows_inline_and_keeps_the_render_process(client, app):
    """Epoch milliseconds (mediarithmics' `choice_ts`) in `date`, a zone that is a directory,
    and a huge number: each an inline `Liquid error`, the rest of the message rendered, and the
    render process kept (an OSError used to end it, reported as out of memory)."""
    from proxy.messages import PREVIEWS

    assert preview(client, "warm").status_code == 200  # a render process started
    started = app.extensions[PREVIEWS].started
    body = preview(client, 'a {{ 1736513475881000 | date: "%Y" }} b {{ "now" | time_zone: "Europe" }} c '
                           '{% assign n = 1 %}{% for i in (1..4400) %}{% assign n = n | times: 10 %}{% endfor %}'
                           '{{ n | number_with_delimiter }} d').get_json()
    assert body["ok"], body
    output = body["output"]
    assert output.startswith("a ") and output.endswith(" d") and output.count("Liquid error") >= 2, output
    assert "time_zone: unknown time zone 'Europe'" in output
    again = preview(client, "{{ 'still' }} here").get_json()
    assert again["output"] == "still here"
    assert app.extensions[PREVIEWS].started == started  # the same render process all along


def test_a_message_the_linter_cannot_read_still_renders(client):
    deep = "{% if false %}{% connected_content /v1/amplitude/properties?user_id=x :headers " \
           + '{"a":' + "[" * 3000 + "]" * 3000 + "} :save r %}{% endif %}ok"
    body = preview(client, deep).get_json()
    assert body["ok"] and body["output"] == "ok", body
