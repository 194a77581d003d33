import threading

import pytest
from conftest import FakeClock

from proxy.cache import AnswerCache, MemoryStore, cache_key
from proxy.errors import UpstreamUnavailable


def make_cache(clock, maxsize=100):
    return AnswerCache(MemoryStore(maxsize, clock), clock, coalesce_wait=2.0)


def test_hit_until_ttl_then_miss():
    clock = FakeClock()
    cache = make_cache(clock)
    calls = []

    def load():
        calls.append(1)
        return len(calls)

    first = cache.fetch("k", load, lambda _v: 60)
    assert (first.value, first.state, first.max_age) == (1, "MISS", 60)
    clock.advance(59)
    hit = cache.fetch("k", load, lambda _v: 60)
    assert (hit.value, hit.state) == (1, "HIT") and hit.max_age == pytest.approx(1) and hit.age == 59
    clock.advance(1)
    assert cache.fetch("k", load, lambda _v: 60).state == "MISS"
    assert len(calls) == 2


def test_ttl_chosen_per_value_and_zero_is_not_stored():
    clock = FakeClock()
    cache = make_cache(clock)
    cache.fetch("neg", lambda: "missing", lambda v: 5 if v == "missing" else 60)
    clock.advance(6)
    assert cache.fetch("neg", lambda: "x", lambda _v: 0).state == "MISS"
    assert cache.fetch("neg", lambda: "x", lambda _v: 0).state == "MISS"


def test_errors_are_not_cached():
    clock = FakeClock()
    cache = make_cache(clock)

    def failing():
        raise UpstreamUnavailable("amplitude", "down")

    with pytest.raises(UpstreamUnavailable):
        cache.fetch("k", failing, lambda _v: 60)
    assert cache.fetch("k", lambda: "ok", lambda _v: 60).state == "MISS"


def test_bounded_by_maxsize():
    clock = FakeClock()
    cache = make_cache(clock, maxsize=3)
    for i in range(10):
        cache.fetch(f"k{i}", lambda i=i: i, lambda _v: 60)
    assert len(cache) == 3


def test_concurrent_misses_coalesce_into_one_load():
    cache = AnswerCache(MemoryStore(100), coalesce_wait=5.0)
    release = threading.Event()
    calls = []

    def slow_load():
        calls.append(1)
        release.wait(5)
        return {"answer": 42}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.fetch("same", slow_load, lambda _v: 60)))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    while not calls:
        pass
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1
    assert len(results) == 20 and all(r.value == {"answer": 42} for r in results)
    assert sorted({r.state for r in results}) == ["COALESCED", "MISS"]


def test_cache_key_sorted_and_secret_free():
    a = cache_key("amplitude", "abcd", "userprofile", {"user_id": "u", "get_recs": "true"})
    b = cache_key("amplitude", "abcd", "userprofile", {"get_recs": "true", "user_id": "u"})
    assert a == b == "amplitude:abcd:userprofile?get_recs=true&user_id=u"
    tricky = cache_key("a", "c", "op", {"user_id": "x&rec_id=y", "rec_id": "z"})
    assert tricky == "a:c:op?rec_id=z&user_id=x%26rec_id%3Dy"
    assert tricky != cache_key("a", "c", "op", {"user_id": "x", "rec_id": "y&rec_id=z"})


def test_a_miss_just_before_another_load_finished_loads_nothing_again():
    """Thread B looks up and misses; thread A loads the key and is done (its flight gone)
    before B asks for a flight: B must serve A's answer, not call the upstream again."""
    clock = FakeClock()
    store = MemoryStore(100, clock)
    cache = AnswerCache(store, clock, coalesce_wait=2.0)
    calls = []
    looked_up = store.get
    lookups = []

    def miss_then_let_a_finish(key):
        entry = looked_up(key)
        lookups.append(key)
        if len(lookups) == 1:  # B's lookup; A runs its whole load before B goes on
            assert cache.fetch(key, lambda: calls.append("A") or "a", lambda _v: 60).state == "MISS"
        return entry

    store.get = miss_then_let_a_finish
    b = cache.fetch("k", lambda: calls.append("B") or "b", lambda _v: 60)
    assert calls == ["A"] and b.value == "a" and b.state == "COALESCED"
