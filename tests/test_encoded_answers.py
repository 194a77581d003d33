"""A cached answer keeps the JSON bytes it was sent as (endpoints.Result.shaped): asked again
while its entry lives, it is neither shaped nor encoded again, and every form of it (flags,
shaper arguments, the in-process call) still reads exactly as when it was first made."""

from __future__ import annotations

import json

import pytest
from conftest import upstream_calls

from proxy.endpoints import ENCODED_BYTES_PER_ANSWER, ENCODED_PER_ANSWER, call
from proxy.shape import amplitude as amplitude_shape

PROPS = "/v1/amplitude/properties?user_id=testUser"
COHORTS = "/v1/amplitude/cohorts?user_id=testUser&cohort_id="


@pytest.fixture
def shaped(monkeypatch):
    """Count each amplitude shaper's calls (the handlers look them up at call time)."""
    counts: dict[str, int] = {}

    def counting(name):
        real = getattr(amplitude_shape, name)

        def shaper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        return shaper

    for name in ("properties", "cohorts", "recommendations"):
        monkeypatch.setattr(amplitude_shape, name, counting(name))
    return counts


def test_the_same_question_is_shaped_once_per_cached_answer(client, sandboxes, shaped):
    answers = [client.get(PROPS) for _ in range(4)]
    assert [r.headers["X-Cache"] for r in answers] == ["MISS", "HIT", "HIT", "HIT"]
    assert shaped["properties"] == 1 and upstream_calls(sandboxes) == 1
    assert len({r.data for r in answers}) == 1  # the very bytes first sent
    assert answers[0].get_json()["found"] is True
    assert all(r.headers["Content-Length"] == str(len(r.data)) for r in answers)


def test_head_and_in_process_calls_read_the_kept_answer(app, shaped):
    client = app.test_client()
    sent = client.get(PROPS).data
    head = client.head(PROPS)
    assert head.data == b"" and head.headers["Content-Length"] == str(len(sent))
    with app.test_request_context():  # a template's call: the body as a mapping, shaped lazily
        done = call(app.extensions["ccproxy"], "/v1/amplitude/properties", {"user_id": "testUser"})
    assert {**done.body} == json.loads(sent)
    assert shaped["properties"] == 2  # the mapping is made when asked for, from the same data


def test_a_stale_answer_is_not_sent_as_the_fresh_one(make_app, sandboxes, clock, shaped):
    client = make_app(cache_grace=0, cache_max_stale=600).test_client()
    fresh = client.get(PROPS)
    assert fresh.get_json()["stale"] is False
    clock.advance(400)  # past the 300 s TTL: the same cached answer, now stale
    sandboxes.state("amplitude").set_fault("error")
    stale = client.get(PROPS)
    assert stale.headers["X-Cache"] == "STALE" and stale.get_json()["stale"] is True
    assert json.loads(stale.data) == {**json.loads(fresh.data), "stale": True}
    assert client.get(PROPS).data == stale.data  # the stale form is kept too
    assert shaped["properties"] == 2  # once fresh, once stale


def test_a_new_upstream_answer_is_shaped_anew(client, sandboxes, clock, shaped):
    client.get(PROPS)
    client.get(PROPS)
    clock.advance(301)  # past the TTL and the default grace: a new entry after the refresh
    client.get(PROPS)
    client.application.extensions["ccproxy"].cache.drain()
    after = client.get(PROPS)
    assert after.headers["X-Cache"] == "HIT" and upstream_calls(sandboxes) == 2
    assert shaped["properties"] == 3  # first answer once, its stale form, the new answer once
    client.get(PROPS)
    assert shaped["properties"] == 3


def test_shaper_arguments_keep_answers_apart_and_the_kept_forms_are_bounded(app, sandboxes, shaped):
    """One cached cohort list answers every cohort_id: each is its own form, at most
    ENCODED_PER_ANSWER are kept, and the rest are shaped each time, never confused."""
    client = app.test_client()
    ids = [f"cohort{n}" for n in range(ENCODED_PER_ANSWER + 2)]
    first = {c: client.get(COHORTS + c).get_json() for c in ids}
    again = {c: client.get(COHORTS + c).get_json() for c in ids}
    assert upstream_calls(sandboxes) == 1
    assert first == again
    assert [c for c in ids if first[c]["member"]] == ["cohort1", "cohort3"]  # testUser's, in range
    assert shaped["cohorts"] == len(ids) + 2  # the forms past the bound were shaped twice
    entries = app.extensions["ccproxy"].cache.store
    kept = [entry.value.encoded for entry in entries._data.values()]
    assert [len(forms) for forms in kept] == [ENCODED_PER_ANSWER]


def test_a_large_answer_is_not_kept(client, monkeypatch):
    """The kept bytes are bounded in size too: an answer over ENCODED_BYTES_PER_ANSWER is
    shaped and encoded each time (as before), never kept."""
    real = amplitude_shape.properties
    monkeypatch.setattr(amplitude_shape, "properties",
                        lambda *a: {**real(*a), "blob": "x" * ENCODED_BYTES_PER_ANSWER})
    answers = [client.get(PROPS) for _ in range(3)]
    assert all(r.status_code == 200 and len(r.data) > ENCODED_BYTES_PER_ANSWER for r in answers)
    assert len({r.data for r in answers}) == 1
    store = client.application.extensions["ccproxy"].cache.store
    assert [len(entry.value.encoded) for entry in store._data.values()] == [0]


def test_the_size_bound_counts_every_kept_form(app, monkeypatch):
    """Forms are kept while their bytes together fit ENCODED_BYTES_PER_ANSWER: two cohort
    forms of ~0.6 of the bound each, so the first is kept and the second is not."""
    real = amplitude_shape.cohorts
    monkeypatch.setattr(amplitude_shape, "cohorts",
                        lambda *a: {**real(*a), "blob": "x" * (ENCODED_BYTES_PER_ANSWER * 6 // 10)})
    client = app.test_client()
    first, second = client.get(COHORTS + "cohort1"), client.get(COHORTS + "cohort2")
    assert first.get_json()["member"] is True and second.get_json()["member"] is False
    kept = [entry.value.encoded for entry in app.extensions["ccproxy"].cache.store._data.values()]
    assert [list(forms.values()) for forms in kept] == [[first.data]]


def test_rec_id_order_is_its_own_answer(client, sandboxes, shaped):
    recs = "/v1/amplitude/recommendations?user_id=alice&rec_id="
    a, b = client.get(recs + "a,b").get_json(), client.get(recs + "b,a").get_json()
    assert upstream_calls(sandboxes) == 1
    assert (a["rec_id"], b["rec_id"]) == ("a", "b")
    assert client.get(recs + "b,a").get_json() == b and client.get(recs + "a,b").get_json() == a
    assert shaped["recommendations"] == 2  # each order kept on the one cached answer


def test_an_answer_json_cannot_carry_is_a_json_500_each_time(client, monkeypatch):
    monkeypatch.setattr(amplitude_shape, "properties", lambda *_: {"ok": True, "when": object()})
    for _ in range(2):  # nothing kept from a failed encoding
        r = client.get(PROPS)
        assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal_error"


def test_an_argument_that_cannot_be_a_key_is_shaped_each_time():
    from proxy.cache import Lookup
    from proxy.clients.base import Answer
    from proxy.endpoints import Result

    answer = Answer({"x": 1})
    lookup = Lookup(answer, "HIT", 0.0, 300.0)
    made = [Result.shaped(lookup, lambda data, extra: {**data, **extra}, {"y": 2}).payload() for _ in range(2)]
    assert made == [b'{"x":1,"y":2,"stale":false,"fallback":false}'] * 2
    assert answer.encoded == {}
