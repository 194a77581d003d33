from proxy.shape.experiment import variants


def test_assigned_and_requested_but_unassigned_flags():
    raw = {"checkout-button": {"key": "treatment", "payload": {"label-text": "Buy", "n": [1, {"a-b": None}]}},
           "hero": {"key": "spring"}}
    out = variants(raw, ["checkout-button", "new-flow"], user_id="u")
    assert out["variants"] == {"checkout_button": "treatment", "hero": "spring", "new_flow": "off"}
    assert out["payloads"] == {"checkout_button": {"label_text": "Buy", "n": [1, {"a_b": None}]}}
    assert out["found"] is True and out["flag_count"] == 3


def test_empty_answer_all_requested_flags_off():
    out = variants({}, ["a", "b-c"])
    assert out["variants"] == {"a": "off", "b_c": "off"} and out["payloads"] == {}
    assert out["found"] is False


def test_variant_without_key_is_not_assigned():
    out = variants({"x": {"payload": 1}, "y": "junk"}, ["x"])
    assert out["variants"] == {"x": "off"} and out["payloads"] == {}


def test_a_payload_sits_under_its_own_flags_name_when_two_flags_collide():
    """`checkout_button` and `checkout-button` both read `checkout_button`: the second is
    `checkout_button_2` in `variants`, and its payload must be found under that name too."""
    answer = variants({"checkout_button": {"key": "control"},
                       "checkout-button": {"key": "treatment", "payload": {"color": "green"}}}, [])
    assert answer["variants"] == {"checkout_button": "control", "checkout_button_2": "treatment"}
    assert answer["payloads"] == {"checkout_button_2": {"color": "green"}}
