"""Shapers on the seed's saved answers (tests/data/amplitude) and edge cases."""

from conftest import all_keys, load_json

from proxy.shape import amplitude as shape
from proxy.shape.common import IDENTIFIER


def user_data(name):
    return load_json(f"amplitude/{name}.json").get("userData")


def test_recommendations_seed_two_ids():
    out = shape.recommendations(user_data("two_recommendations"), ["testRecId", "testRecId2"])
    assert out["ok"] and out["found"]
    assert out["user_id"] == "testUser" and out["device_id"] == "ffff-ffff-ffff-ffff"
    assert out["rec_id"] == "testRecId"
    assert out["items"] == ["cookie", "cracker", "chocolate milk", "donut", "croissant"]
    assert out["item_1"] == "cookie" and out["item_5"] == "croissant" and "item_6" not in out
    assert out["item_count"] == 5
    assert out["items_joined"] == "cookie, cracker, chocolate milk, donut, croissant"
    assert out["is_control"] is False and out["source"] == "model"
    assert out["last_updated"] == "2020-12-22T20:58:40Z"
    second = out["recommendations"]["testRecId2"]
    assert second["item_1"] == "bulgogi" and second["source"] == "model2"
    assert second["last_updated"] == "2020-12-22T20:57:38Z"


def test_recommendations_order_follows_request_not_upstream():
    out = shape.recommendations(user_data("two_recommendations"), ["testRecId2", "testRecId"])
    assert out["rec_id"] == "testRecId2" and out["item_1"] == "bulgogi"


def test_recommendation_keys_are_identifiers_but_rec_id_value_kept():
    data = {"recommendations": [{"rec_id": "summer-sale", "items": ["x"]}], "user_id": "u", "device_id": "d"}
    out = shape.recommendations(data, ["summer-sale"])
    assert out["recommendations"]["summer_sale"]["rec_id"] == "summer-sale"
    assert out["rec_id"] == "summer-sale"
    assert all(IDENTIFIER.match(k) for k in all_keys(out))


def test_inactive_user_recommendations_null_is_found_false_no_nulls():
    out = shape.recommendations(user_data("inactive"), ["testRecId"])
    assert out["found"] is False
    assert out["items"] == [] and out["item_count"] == 0 and out["items_joined"] == ""
    assert out["source"] == "" and out["last_updated"] == "" and out["is_control"] is False
    assert None not in out.values()


def test_not_seen_user_echoes_asked_ids():
    out = shape.recommendations(None, ["r"], user_id="ghost")
    assert out["found"] is False and out["user_id"] == "ghost" and out["device_id"] == ""
    assert out["recommendations"]["r"]["found"] is False


def test_properties_keep_json_types():
    out = shape.properties(user_data("properties"))
    assert out["properties"] == {
        "library": "http/1.0", "first_used": "2020-01-13", "last_used": "2021-03-24",
        "number_property": 12, "boolean_property": True,
    }
    assert out["found"] is True
    assert shape.properties(None)["properties"] == {}


def test_computations_numbers_and_identifier_keys():
    out = shape.computations(user_data("computations"))
    assert out["computations"] == {"computed_prop_1": 5000000.0, "computed_prop_2": 3}
    assert "value" not in out
    one = shape.computations(user_data("one_computation"), comp_id="testCompId")
    assert one["value"] == 3 and one["computations"] == {"computed_prop_2": 3}


def test_computation_missing_is_found_false_with_zero_value():
    out = shape.computations(user_data("inactive"), comp_id="nope")
    assert out["found"] is False and out["value"] == 0 and out["comp_found"] is False
    assert out["computations"] == {}


def test_cohorts_and_membership():
    out = shape.cohorts(user_data("cohorts"), cohort_id="cohort3")
    assert out["cohort_ids"] == ["cohort1", "cohort3", "cohort7"]
    assert out["cohort_count"] == 3 and out["cohorts"] == {"cohort1": True, "cohort3": True, "cohort7": True}
    assert out["member"] is True
    assert shape.cohorts(user_data("cohorts"), cohort_id="cohort2")["member"] is False
    empty = shape.cohorts(None, cohort_id="cohort1")
    assert empty["found"] is False and empty["cohort_count"] == 0 and empty["member"] is False


def test_profile_combines_everything():
    data = dict(user_data("two_recommendations"))
    data["amp_props"] = {"library": "http/1.0", "computed-prop-1": "5000000.0"}
    data["cohort_ids"] = ["cohort1"]
    out = shape.profile(data, ["testRecId"])
    assert out["found"] is True and out["item_1"] == "cookie"
    # amp_props (mixed), keys made identifiers; computations are numbers, as on /computations.
    assert out["properties"] == {"library": "http/1.0", "computed_prop_1": 5000000.0}
    assert out["computations"] == {"computed_prop_1": 5000000.0}
    assert out["cohorts"] == {"cohort1": True}
    assert "rec_id" not in shape.profile(data)
