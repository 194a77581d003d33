from proxy.shape.target import profile

RAW = {
    "client": "acme",
    "visitorId": {"tntId": "111492025094307-353046", "thirdPartyId": "a1-mbox3rdPartyId"},
    "modifiedAt": "2025-01-10T10:20:00.000Z",
    "profileAttributes": {
        "user.memberlevel": {"value": "gold", "modifiedAt": "2025-01-10T10:20:00.000Z"},
        "user.points": {"value": "2450"},
        "empty": {"value": None},
    },
}


def test_profile_attributes_flat_and_identifiers():
    out = profile(RAW)
    assert out["profile"] == {"user_memberlevel": "gold", "user_points": "2450", "empty": ""}
    assert out["tnt_id"] == "111492025094307-353046" and out["third_party_id"] == "a1-mbox3rdPartyId"
    # every date is YYYY-MM-DDTHH:MM:SSZ (Target sends milliseconds)
    assert out["modified_at"] == "2025-01-10T10:20:00Z" and out["found"] is True
    # upstream strings kept; their numeric twins beside them
    assert out["numbers"] == {"user_points": 2450}
    assert out["attribute_count"] == 3


def test_missing_profile_echoes_asked_id():
    out = profile(None, third_party_id="crm-9")
    assert out == {"ok": True, "found": False, "tnt_id": "", "third_party_id": "crm-9",
                   "modified_at": "", "profile": {}, "attribute_count": 0, "numbers": {}}
