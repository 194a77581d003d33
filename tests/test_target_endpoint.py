"""Adobe Target profiles end to end against the sandbox Profile API."""

from urllib.parse import quote

URL = "/v1/adobe-target/profile"


def test_by_tntid_and_third_party_id(client):
    by_tnt = client.get(f"{URL}?tntid=111492025094307-353046").get_json()
    by_3rd = client.get(f"{URL}?third_party_id=a1-mbox3rdPartyId").get_json()
    assert by_tnt["profile"]["user_memberlevel"] == "gold"
    assert by_tnt["profile"] == by_3rd["profile"]
    assert by_3rd["tnt_id"] == "111492025094307-353046"


def test_no_profile_found_is_200_found_false(client):
    for query in ("third_party_id=unknown-5", "tntid=expired-1"):
        r = client.get(f"{URL}?{query}")
        assert r.status_code == 200 and r.get_json()["found"] is False


def test_ids_cannot_change_the_upstream_path_or_query(client, sandboxes):
    state = sandboxes.state("target")
    for evil in ("../../admin", "a/b?client=other#x", "..", "x%2F..%2Fy", "id&client=evil"):
        r = client.get(f"{URL}?third_party_id={quote(evil, safe='')}")
        assert r.status_code == 200, evil
        raw = state.last_uri
        path, _, query = raw.partition("?")
        assert path.startswith("/rest/v1/profiles/thirdPartyId/"), raw
        assert path.count("/") == 5, raw  # exactly one segment for the id
        assert query == "client=sandbox", raw


def test_one_id_required(client):
    for query in ("", "tntid=a&third_party_id=b"):
        r = client.get(f"{URL}?{query}")
        assert r.status_code == 400 and r.get_json()["ok"] is False


def test_token_sent_as_bearer(sandboxes):
    from proxy import config, create_app
    from proxy.sandbox import target
    from proxy.sandbox.server import RunningServer

    server = RunningServer(target.make_app(token="t0ken")).start()
    try:
        def app_with(token):
            settings = config.load(overrides={"target_url": server.url, "target_client_code": "sandbox",
                                              "target_token": token}, environ={})
            return create_app(settings).test_client()

        assert app_with("t0ken").get(f"{URL}?tntid=x1").get_json()["found"] is True
        assert app_with("bad").get(f"{URL}?tntid=x1").status_code == 502
    finally:
        server.stop()


def test_client_code_required(make_app):
    r = make_app(target_client_code="", target_url="").test_client().get(f"{URL}?tntid=a")
    assert r.status_code == 503 and "CCPROXY_TARGET_CLIENT_CODE" in r.get_json()["error"]["message"]
