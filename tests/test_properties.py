"""Property tests of the key normalisation and flattening every answer goes through."""

from __future__ import annotations

from conftest import all_keys
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.shape.common import IDENTIFIER, deep_identifier_keys, flatten, identifier_keys

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
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
