"""Property tests of the key normalisation and flattening every answer goes through."""

from __future__ import annotations

from conftest import all_keys
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.shape.common import IDENTIFIER, deep_identifier_keys, flatten, identifier_keys

# What our decoder can produce: JSON has no NaN or infinity (clients/base.py refuses both).
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=6)


def leaves(value):
    if isinstance(value, dict):
        for child in value.values():
            yield from leaves(child)
    elif isinstance(value, list):
        for child in value:
            yield from leaves(child)
    else:
        yield value


@settings(max_examples=300)
@given(json_values)
def test_only_identifier_keys_out_and_no_value_lost(value):
    out = deep_identifier_keys(value)
    assert all(IDENTIFIER.match(k) for k in all_keys(out))
    assert sorted(map(repr, leaves(out))) == sorted(map(repr, leaves(value)))


@settings(max_examples=300)
@given(objects)
def test_collisions_are_deterministic_whatever_the_order(obj):
    reordered = dict(reversed(list(obj.items())))
    assert identifier_keys(obj) == identifier_keys(reordered)
    assert len(identifier_keys(obj)) == len(obj)


@settings(max_examples=300)
@given(objects)
def test_flatten_keeps_every_leaf_under_identifier_keys(obj):
    flat = flatten(obj, drop_prefix="$")
    assert all(IDENTIFIER.match(k) for k in flat)
    # Non-empty nested objects become keys; every other value survives as one value.
    def count(o):
        return sum(count(v) if isinstance(v, dict) and v else 1 for v in o.values())
    assert len(flat) == count(obj)


# What an upstream may send inside the outer type its client checks: the documented field
# names, each holding any JSON at all (a lying upstream), so every shaper path is reached.
def vendor_object(fields, inner=json_values):
    return st.fixed_dictionaries({}, optional={name: inner for name in fields})


recs = st.lists(vendor_object(("rec_id", "child_rec_id", "items", "is_control", "recommendation_source",
                               "last_updated")) | json_values, max_size=3)
user_data = st.fixed_dictionaries({}, optional={
    "recommendations": recs | json_values, "amp_props": json_values, "cohort_ids": json_values,
    "user_id": json_values, "device_id": json_values})
target_raw = st.fixed_dictionaries({}, optional={
    "visitorId": vendor_object(("tntId", "thirdPartyId")) | json_values,
    "profileAttributes": st.dictionaries(st.text(max_size=6), vendor_object(("value",)) | json_values,
                                         max_size=4) | json_values,
    "modifiedAt": json_values})
records = st.none() | st.lists(vendor_object(("$processing_id", "$choice_acceptance_value", "$choice_ts"))
                               | json_values, max_size=3)


def answers_cleanly(answer):
    """A Liquid-safe answer: JSON our encoder accepts, ids as strings, lists as lists."""
    from proxy.responses import json_bytes

    json_bytes(answer)
    for name in ("user_id", "device_id", "tnt_id", "third_party_id", "rec_id", "child_rec_id", "source"):
        assert isinstance(answer.get(name, ""), str), (name, answer.get(name))
    for name in ("items", "cohort_ids", "profiles", "choices_list", "history"):
        assert isinstance(answer.get(name, []), list), (name, answer.get(name))


@settings(max_examples=400)
@given(user_data | st.none(), st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=2))
def test_amplitude_shapers_answer_whatever_user_data_holds(data, rec_ids):
    from proxy.shape import amplitude

    answers_cleanly(amplitude.recommendations(data, rec_ids, "u"))
    answers_cleanly(amplitude.properties(data, "u"))
    answers_cleanly(amplitude.computations(data, None, "u"))
    answers_cleanly(amplitude.computations(data, "c", "u"))
    answers_cleanly(amplitude.cohorts(data, "7", "u"))
    answers_cleanly(amplitude.profile(data, rec_ids, "u"))


@settings(max_examples=300)
@given(target_raw | st.none())
def test_the_target_shaper_answers_whatever_the_profile_holds(raw):
    from proxy.shape import target

    answers_cleanly(target.profile(raw, "t"))


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=6), vendor_object(("key", "payload")) | json_values, max_size=4))
def test_the_experiment_shaper_answers_whatever_vardata_holds(vardata):
    from proxy.shape import experiment

    answers_cleanly(experiment.variants(vardata, ["f"], "u"))


@settings(max_examples=300)
@given(records)
def test_mediarithmics_shapers_answer_whatever_the_records_hold(data):
    from proxy.shape import mediarithmics

    answers_cleanly(mediarithmics.profile(data))
    answers_cleanly(mediarithmics.choices(data, "101"))
    answers_cleanly(mediarithmics.history(data, "101"))


def test_colliding_keys_are_named_in_linear_time():
    """An upstream can send thousands of keys that become one identifier (`a-`, `a.`, `a!`):
    naming them must not probe `_2`, `_3`... again for each (it ran for seconds per answer)."""
    import time

    keys = {f"a{chr(0x2000 + i)}": i for i in range(20_000)}
    started = time.process_time()
    named = identifier_keys(keys)
    assert len(named) == len(keys) and named["a_"] == 0 and named["a__20000"] == 19_999
    assert sorted(named.values()) == list(range(20_000))
    assert time.process_time() - started < 5  # quadratic probing takes minutes here
