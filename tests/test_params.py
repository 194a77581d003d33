"""proxy/params.py: the query validators every endpoint shares, and the parameter schemas
the OpenAPI document is built from (the same limits)."""

from __future__ import annotations

import re

import pytest

from proxy import params
from proxy.errors import BadRequest


def refused(call, *args, code: str):
    with pytest.raises(BadRequest) as caught:
        call(*args)
    assert caught.value.code == code and caught.value.status == 400
    return caught.value.message


def test_identifier_bounds_length_and_control_characters():
    assert params.identifier({"user_id": "u" * 256}, "user_id") == "u" * 256
    assert params.identifier({"user_id": ""}, "user_id") is None
    assert "256" in refused(params.identifier, {"user_id": "u" * 257}, "user_id", code="invalid_parameter")
    refused(params.identifier, {"user_id": "a\nb"}, "user_id", code="invalid_parameter")
    assert "user_id" in refused(lambda: params.identifier({}, "user_id", required=True), code="missing_parameter")


def test_id_list_drops_blanks_and_duplicates_and_keeps_order():
    assert params.id_list({"rec_id": "b, a,,b ,c"}, "rec_id") == ["b", "a", "c"]
    assert params.id_list({}, "rec_id") == []
    refused(lambda: params.id_list({"rec_id": " , "}, "rec_id", required=True), code="missing_parameter")
    many = ",".join(f"r{i}" for i in range(params.MAX_LIST_LENGTH + 1))
    refused(params.id_list, {"rec_id": many}, "rec_id", code="invalid_parameter")


def test_boolean_and_choice_take_their_documented_values_only():
    for text in params.PARAM_SCHEMAS["track"]["enum"]:
        expected = text in ("true", "1", "yes")
        assert params.boolean({"track": text}, "track", not expected) is expected
    assert params.boolean({"track": "TRUE"}, "track", False) is True
    assert params.boolean({}, "track", True) is True
    refused(params.boolean, {"track": "maybe"}, "track", True, code="invalid_parameter")
    assert params.choice({"rec_type": "model"}, "rec_type", ("model", "random")) == "model"
    refused(params.choice, {"rec_type": "best"}, "rec_type", ("model", "random"), code="invalid_parameter")


def test_user_ref_needs_one_of_the_two_ids():
    assert params.user_ref({"device_id": "d"}) == ("", "d")
    refused(params.user_ref, {"user_id": ""}, code="missing_parameter")


def test_json_object_is_an_object_of_bounded_size():
    assert params.json_object({"context": '{"a":1}'}, "context") == {"a": 1}
    assert params.json_object({}, "context") == {}
    refused(params.json_object, {"context": "[1]"}, "context", code="invalid_json")
    refused(params.json_object, {"context": "{"}, "context", code="invalid_json")
    refused(params.json_object, {"context": '{"a":"' + "x" * 8200 + '"}'}, "context", code="invalid_parameter")


def test_user_point_selector_is_exactly_one_selector():
    assert params.user_point_selector({"email_hash": "h"}) == {"email_hash": "h"}
    assert params.user_point_selector({"compartment_id": "1", "user_account_id": "a"}) == {
        "compartment_id": "1", "user_account_id": "a"}
    refused(params.user_point_selector, {"compartment_id": "1"}, code="invalid_selector")
    refused(params.user_point_selector, {"email_hash": "h", "user_point_id": "p"}, code="invalid_selector")
    refused(params.user_point_selector, {}, code="invalid_selector")
    assert set(params.USER_POINT_PARAMS) == {*params.USER_POINT_SELECTORS, "compartment_id", "user_account_id"}


def test_processing_id_is_a_bounded_number():
    assert params.processing_id({"processing_id": "101"}) == "101"
    assert params.processing_id({}) is None
    for bad in ("10a", "\u0661", "1" * 33):  # a letter, an Arabic-Indic digit, too long
        refused(params.processing_id, {"processing_id": bad}, code="invalid_parameter")
    refused(lambda: params.processing_id({}, required=True), code="missing_parameter")


def test_prefixed_and_scalar_read_typed_properties():
    found = params.prefixed({"user_properties.premium": "true", "user_properties.n": "3", "x": "1"},
                            "user_properties.")
    assert {k: params.scalar(v) for k, v in found.items()} == {"premium": True, "n": 3}
    assert params.scalar("abc") == "abc"


def test_the_schemas_say_what_the_validators_enforce():
    ident = params.PARAM_SCHEMAS["user_id"]
    assert ident["maxLength"] == params.MAX_ID_LENGTH
    pattern = re.compile(ident["pattern"])
    for value in ("ok-value", "a\x01b", "a\x7fb"):
        valid = True
        try:
            params.identifier({"v": value}, "v")
        except BadRequest:
            valid = False
        assert bool(pattern.match(value)) is valid, value
    assert str(params.MAX_LIST_LENGTH) in params.PARAM_SCHEMAS["rec_id"]["description"]
