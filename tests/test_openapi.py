"""The published contract: valid OpenAPI 3.1, complete, and what the endpoints really answer."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import validate

from proxy import config
from proxy.app import create_app
from proxy.endpoints import build_registry
from proxy.openapi import document, markdown_reference
from proxy.services import of_app

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def doc():
    """The document of an app on the default settings (`python -m proxy.openapi`'s)."""
    app = create_app(config.load(environ={}))
    try:
        yield document(app)
    finally:
        of_app(app).close()


def validator_for(doc, schema):
    root = {**schema, "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


def test_valid_openapi_31(client, doc):
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert client.get("/openapi.json").get_json() == doc


def test_every_route_is_documented(app, doc):
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        assert path in doc["paths"], f"{rule.rule} is not in the OpenAPI document"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"][path], f"{method} {rule.rule} is not documented"


@pytest.mark.parametrize("path", sorted(build_registry()))
def test_every_example_answer_matches_its_schema(client, doc, path):
    operation = doc["paths"][path]["get"]
    r = client.get(f"{path}?{operation['x-example']}")
    assert r.status_code == 200
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    validator_for(doc, schema).validate(r.get_json())


def test_not_found_answers_match_too(client, doc):
    for path, query in (("/v1/amplitude/recommendations", "user_id=unknown-1&rec_id=a"),
                        ("/v1/amplitude/profile", "user_id=unknown-1"),
                        ("/v1/adobe-target/profile", "tntid=unknown-1"),
                        ("/v1/mediarithmics/choices", "email_hash=unknown-1")):
        schema = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        validator_for(doc, schema).validate(client.get(f"{path}?{query}").get_json())


def test_a_field_missing_from_the_typeddict_fails_validation(doc):
    schema = doc["paths"]["/v1/amplitude/cohorts"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    answer = {"ok": True, "found": True, "user_id": "u", "device_id": "d", "stale": False, "fallback": False,
              "cohort_ids": [], "cohort_count": 0, "cohort_ids_joined": "", "cohorts": {}, "new_field": 1}
    with pytest.raises(jsonschema.ValidationError, match="new_field"):
        validator_for(doc, schema).validate(answer)


def test_errors_match_the_error_shape(client, doc):
    error = validator_for(doc, {"$ref": "#/components/schemas/Error"})
    for url in ("/v1/amplitude/recommendations?user_id=u", "/v1/nope", "/v1/render/nope?user_id=u",
                "/v1/mediarithmics/profile?user_point_id=a&email_hash=b"):
        error.validate(client.get(url).get_json())


def test_parameter_constraints_come_from_the_validators(doc):
    params = {p["name"]: p for p in doc["paths"]["/v1/amplitude/recommendations"]["get"]["parameters"]}
    assert params["rec_id"]["required"] is True and params["user_id"]["required"] is False
    assert params["user_id"]["schema"]["maxLength"] == 256
    assert params["rec_type"]["schema"]["enum"] == ["model", "random"]


def test_readme_reference_is_generated_from_the_document(doc):
    text = README.read_text()
    start = text.index("<!-- reference:start -->") + len("<!-- reference:start -->\n")
    end = text.index("<!-- reference:end -->")
    assert text[start:end] == markdown_reference(doc), "run: python -m proxy.openapi --markdown"


def test_every_setting_is_documented_in_the_readme():
    from dataclasses import fields

    from proxy.config import Settings, env_name

    text = README.read_text()
    missing = [env_name(f.name) for f in fields(Settings) if env_name(f.name) not in text]
    assert not missing, f"settings without docs in the README: {missing}"


def test_paths_come_from_the_url_map_and_every_route_needs_its_operation(make_app):
    from proxy.openapi import openapi_path

    app = make_app(start_delivery=False)
    assert openapi_path("/v1/mediarithmics/writes/<write_id>") == "/v1/mediarithmics/writes/{write_id}"
    assert openapi_path("/v1/x/<int:n>/<name>") == "/v1/x/{n}/{name}"

    @app.get("/v1/undocumented")
    def undocumented():
        return "x"

    with pytest.raises(ValueError, match="/v1/undocumented"):
        document(app)


def test_the_document_is_the_given_apps(tmp_path, doc):
    from collections.abc import Mapping
    from typing import TypedDict

    from proxy.endpoints import Context, Result, endpoint

    class EchoAnswer(TypedDict):
        ok: bool
        found: bool
        said: str

    @endpoint("/v1/test/echo", "A test-only endpoint.", ("user_id",), answer=EchoAnswer)
    def echo(ctx: Context, args: Mapping[str, str]) -> Result:
        return Result({"ok": True, "found": True, "said": ""})

    app = create_app(config.load(overrides={"outbox_path": str(tmp_path / "o.sqlite3")}, environ={}),
                     endpoints=build_registry([echo]))
    try:
        own = document(app)
    finally:
        of_app(app).close()
    assert own["paths"]["/v1/test/echo"]["get"]["summary"] == "A test-only endpoint."
    assert "EchoAnswer" in own["components"]["schemas"]
    assert "/v1/test/echo" not in doc["paths"]
    assert {path: item for path, item in own["paths"].items() if path != "/v1/test/echo"} == doc["paths"]


def test_the_command_prints_the_default_apps_document(capsys, doc):
    import json

    from proxy import openapi

    openapi.main([])
    assert json.loads(capsys.readouterr().out) == doc
    openapi.main(["--markdown"])
    assert capsys.readouterr().out == markdown_reference(doc)


def test_the_document_is_built_once_per_app(app, monkeypatch):
    """Each build walks every route and schema (milliseconds): a caller asking again and again
    must not make the worker rebuild it each time."""
    from proxy import openapi

    builds = []
    real = openapi.document
    monkeypatch.setattr(openapi, "document", lambda a: builds.append(a) or real(a))
    client = app.test_client()
    answers = [client.get("/openapi.json") for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert answers[0].data == answers[2].data and answers[0].mimetype == "application/json"
    assert len(builds) == 1
