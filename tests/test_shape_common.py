from proxy.shape.common import (
    IDENTIFIER,
    deep_identifier_keys,
    flatten,
    identifier_keys,
    iso_from_epoch_millis,
    iso_from_epoch_seconds,
    list_fields,
    number_or_text,
    to_identifier,
)


def test_to_identifier_replaces_runs_and_leading_digits():
    assert to_identifier("computed-prop-2") == "computed_prop_2"
    assert to_identifier("user.memberlevel") == "user_memberlevel"
    assert to_identifier("summer--sale!") == "summer_sale_"
    assert to_identifier("2fast") == "_2fast"
    assert to_identifier("") == "_"
    assert to_identifier("prénom") == "pr_nom"
    assert to_identifier("Case_Kept") == "Case_Kept"


def test_identifier_keys_collisions_are_order_independent():
    a = identifier_keys({"a-b": 1, "a.b": 2, "a_b": 3})
    b = identifier_keys({"a_b": 3, "a.b": 2, "a-b": 1})
    assert a == b == {"a_b": 3, "a_b_2": 1, "a_b_3": 2}


def test_deep_identifier_keys_all_depths_values_kept():
    value = {"x-y": [{"in-list": {"deep.er": None}}], "ok": "Zürich"}
    out = deep_identifier_keys(value)
    assert out == {"x_y": [{"in_list": {"deep_er": None}}], "ok": "Zürich"}


def test_flatten_nested_objects_and_drops_prefix():
    out = flatten({"$email": "a@b.c", "address": {"$city": "Lyon", "zip-code": "69001"}, "tags": []}, "$")
    assert out == {"address_city": "Lyon", "address_zip_code": "69001", "email": "a@b.c", "tags": []}
    assert all(IDENTIFIER.match(k) for k in out)


def test_list_fields():
    assert list_fields(["a", "b"]) == {"item_1": "a", "item_2": "b", "item_count": 2, "items_joined": "a, b"}
    assert list_fields([]) == {"item_count": 0, "items_joined": ""}


def test_iso_dates():
    assert iso_from_epoch_seconds(1608670720) == "2020-12-22T20:58:40Z"
    assert iso_from_epoch_millis(1608670720000) == "2020-12-22T20:58:40Z"
    assert iso_from_epoch_seconds(None) == ""
    assert iso_from_epoch_seconds(True) == ""
    assert iso_from_epoch_seconds(10**20) == ""


def test_number_or_text():
    assert number_or_text("3") == 3 and isinstance(number_or_text("3"), int)
    assert number_or_text("5000000.0") == 5000000.0 and isinstance(number_or_text("5000000.0"), float)
    assert number_or_text("-1.5") == -1.5
    for kept in ("007", "1e5", "NaN", "abc", "", " 3"):
        assert number_or_text(kept) == kept
    assert number_or_text(4) == 4


def test_canonical_numbers_only():
    from proxy.shape.common import canonical_number, numbers

    assert canonical_number("2450") == 2450 and canonical_number("-0.5") == -0.5
    assert canonical_number("123456789012345") == 123456789012345
    for text in ("007", "1e5", "NaN", "+1", "1.", ".5", "1234567890123456", "69 631", ""):
        assert canonical_number(text) is None, text
    assert canonical_number(True) is None and canonical_number(float("inf")) is None
    assert numbers({"points": "2450", "zip": "69631", "code": "007", "n": 3, "flag": True}) == {
        "points": 2450, "zip": 69631, "n": 3}


def test_dates_are_seconds_in_utc():
    from proxy.shape.common import iso_from_text

    assert iso_from_text("2025-01-10T10:20:00.000Z") == "2025-01-10T10:20:00Z"
    assert iso_from_text("2025-01-10T12:20:00+02:00") == "2025-01-10T10:20:00Z"
    assert iso_from_text("yesterday") == "" and iso_from_text(None) == ""
