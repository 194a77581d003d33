from proxy.shape import mediarithmics as shape

CHOICES = [
    {"$processing_id": "101", "$choice_ts": 1735689600000, "$choice_acceptance_value": True, "channel": "email"},
    {"$processing_id": "102", "$choice_ts": 1735689600000, "$choice_acceptance_value": "false"},
]


def test_profile_flattened_without_dollar_prefix():
    out = shape.profile([{"$user_account_id": "a", "loyalty": {"tier": "gold"}, "$creation_ts": 1735689600000}])
    assert out["profile"]["user_account_id"] == "a"
    assert out["profile"]["loyalty_tier"] == "gold"
    assert out["profile"]["creation_ts_iso"] == "2025-01-01T00:00:00Z"
    assert out["found"] is True and out["profile_count"] == 1
    assert shape.profile(None)["found"] is False


def test_choices_flags_and_list():
    out = shape.choices(CHOICES)
    assert out["choices"] == {"processing_101": True, "processing_102": False}
    assert out["choices_list"][0]["choice_ts_iso"] == "2025-01-01T00:00:00Z"
    assert out["choices_list"][0]["processing_id"] == "101"
    only = shape.choices(CHOICES, "102")
    assert only["choices"] == {"processing_102": False} and only["choice_count"] == 1


def test_history_newest_first():
    entries = [{"$choice_ts": 2}, {"$choice_ts": 3}, {"$choice_ts": 1}]
    out = shape.history(entries, "101")
    assert [e["choice_ts"] for e in out["history"]] == [3, 2, 1]
    assert out["history_count"] == 3 and out["processing_id"] == "101"


def test_requested_processing_without_a_record_reads_false_and_unrecorded():
    from proxy.shape.mediarithmics import choices as shape_choices

    out = shape_choices([{"$processing_id": "102", "$choice_acceptance_value": True}], "101")
    assert out["choices"] == {"processing_101": False} and out["unrecorded"] == ["101"]
    assert out["found"] is False and out["choice_count"] == 0
    refused = shape_choices([{"$processing_id": "101", "$choice_acceptance_value": False}], "101")
    assert refused["choices"] == {"processing_101": False} and refused["unrecorded"] == []


def test_profile_numbers_beside_upstream_values():
    from proxy.shape.mediarithmics import profile as shape_profile

    out = shape_profile([{"loyalty_points": 157, "address": {"zip_code": "69631"}, "code": "007"}])
    assert out["profile"]["address_zip_code"] == "69631"
    assert out["numbers"] == {"loyalty_points": 157, "address_zip_code": 69631}
