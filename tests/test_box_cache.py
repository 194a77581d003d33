"""One cache per box: `ccproxy serve --workers 3` without Redis makes one upstream call per key
per TTL for the whole machine, a warmed cache answers in every worker, and a store that cannot
be used degrades to per-worker caching, never to errors. Real HTTP, sandbox upstreams counting
calls; which worker answered is read from `/metrics` (cache lookups carry a `worker` label)."""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from ccproxy_serve import serving
from conftest import upstream_calls
from servers import wait_for

RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="
# Counts are asserted, not speed: a busy machine must not turn a wait into a 503.
PATIENT = {"CCPROXY_REQUEST_DEADLINE": "20", "CCPROXY_COALESCE_WAIT": "20",
           "CCPROXY_UPSTREAM_READ_TIMEOUT": "10", "CCPROXY_RATE_LIMIT_AMPLITUDE": "0"}
LOOKUP = re.compile(r'^ccproxy_cache_lookups_total\{result="(\w+)",worker="(\d+)"\} ([0-9.e+]+)$', re.M)


def lookups_by_worker(base: str) -> dict[str, float]:
    """Cache lookups per worker pid, summed over results (copied into metrics once a second)."""
    text = requests.get(base + "/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for _result, worker, value in LOOKUP.findall(text):
        totals[worker] = totals.get(worker, 0.0) + float(value)
    return totals


def metric(base: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def workers_that_answered(base: str, before: dict[str, float], requests_sent: int) -> set[str]:
    """Pids whose lookups grew, once every worker's count has caught up with what was sent."""
    def caught_up():
        now = lookups_by_worker(base)
        if sum(now.values()) - sum(before.values()) >= requests_sent:
            return now
        return None

    now = wait_for(caught_up, seconds=30, poll=0.2, what="every worker's lookups in /metrics")
    return {pid for pid, count in now.items() if count > before.get(pid, 0.0)}


def fan_out(base: str, path: str, count: int) -> list[requests.Response]:
    """`count` concurrent requests, each on its own connection (so the workers share them)."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _i: requests.get(base + path, timeout=60), range(count)))


@pytest.fixture
def three_workers(sandboxes, tmp_path):
    with serving(sandboxes, tmp_path / "serve.log", PATIENT, workers=3) as (base, _proc):
        yield base


def test_concurrent_misses_in_three_workers_make_one_upstream_call(three_workers, sandboxes):
    base = three_workers
    sandboxes.state("amplitude").latency = 0.5  # every request arrives while the first is in flight
    spans = []
    try:
        # The kernel deals connections to workers as it likes: a few rounds, until one spans them all.
        for round_ in range(6):
            before_calls, before = upstream_calls(sandboxes), lookups_by_worker(base)
            answers = fan_out(base, f"{RECS}crowd-{round_}", 30)
            assert {a.status_code for a in answers} == {200}
            assert len({a.content for a in answers}) == 1
            assert upstream_calls(sandboxes) - before_calls == 1, f"round {round_}"
            spans.append(len(workers_that_answered(base, before, 30)))
            if spans[-1] == 3:
                break
    finally:
        sandboxes.state("amplitude").latency = 0
    assert max(spans) >= 2, f"the requests never reached two workers: {spans}"


def test_after_warm_every_worker_answers_a_hit(three_workers, sandboxes, tmp_path):
    base = three_workers
    users = [f"warm-{i}" for i in range(10)]
    csv = tmp_path / "users.csv"
    csv.write_text("user_id\n" + "\n".join(users) + "\n")
    subprocess.run([sys.executable, "-m", "proxy.cli", "warm", "--endpoint", "recommendations",
                    "--rec-id", "testRecId", "--users", str(csv), "--url", base, "--rate", "60000"],
                   check=True, capture_output=True, timeout=120)
    warmed = upstream_calls(sandboxes)
    assert warmed == len(users)

    # The warm-up's own lookups counted first, so the growth below is the send's alone.
    before = wait_for(lambda: (now := lookups_by_worker(base)) and sum(now.values()) >= len(users) and now,
                      seconds=30, poll=0.2, what="the warm-up's lookups in /metrics")
    answers = []
    for user in users:
        each = fan_out(base, RECS + user, 9)
        # Every worker sends the same bytes for one user (each keeps its own, endpoints.Result.shaped).
        assert len({a.content for a in each}) == 1 and each[0].json()["user_id"] == user
        answers += each
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["X-Cache"] for a in answers} == {"HIT"}
    assert upstream_calls(sandboxes) == warmed  # no worker had to ask the upstream again
    assert len(workers_that_answered(base, before, len(answers))) >= 2
    assert metric(base, "ccproxy_box_cache_lookups_total", result="HIT") >= 1


def test_a_box_cache_that_cannot_be_opened_degrades_to_each_workers_memory(sandboxes, tmp_path):
    env = {**PATIENT, "CCPROXY_BOX_CACHE_PATH": "/dev/null/box-cache.sqlite3"}  # cannot exist
    with serving(sandboxes, tmp_path / "serve.log", env, workers=2) as (base, _proc):
        first = requests.get(base + RECS + "testUser", timeout=30)
        assert first.status_code == 200 and first.json()["item_1"] == "cookie"
        again = wait_for(lambda: (r := requests.get(base + RECS + "testUser", timeout=30)).headers[
            "X-Cache"] == "HIT" and r, what="a hit from a worker's own memory")
        assert again.json() == first.json()
        ready = requests.get(base + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert "box_cache_unusable" in [r["code"] for r in ready.json()["reasons"]]
        wait_for(lambda: metric(base, "ccproxy_box_cache_degraded_total", reason="unavailable") >= 1,
                 seconds=30, what="the unusable box counted")


@pytest.fixture
def served_on_full_tmpfs(sandboxes, tmp_path):
    """`ccproxy serve` (two workers) in its own mount namespace, its box cache on a small tmpfs
    that the test fills (as root, file modes prove nothing)."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed for this test")
    mount_dir = tmp_path / "box-fs"
    mount_dir.mkdir()
    env = {**PATIENT, "CCPROXY_BOX_CACHE_PATH": str(mount_dir / "box.sqlite3")}

    def in_namespace(command):
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o size=2m tmpfs {mount_dir} && exec {' '.join(command)}"]

    with serving(sandboxes, tmp_path / "serve.log", env, wrap=in_namespace) as (base, proc):
        yield base, Path(f"/proc/{proc.pid}/root{mount_dir}")  # the server's mount namespace


def test_a_full_box_cache_still_answers_and_counts_it(served_on_full_tmpfs, sandboxes):
    base, mount = served_on_full_tmpfs
    assert requests.get(base + RECS + "before-full", timeout=30).status_code == 200
    assert (mount / "box.sqlite3").exists()
    try:  # the memory file system fills up
        with open(mount / "fill", "wb") as fill:
            while True:
                fill.write(b"\0" * 4096)
                fill.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    # Distinct users until the box's WAL needs room it does not have.
    for i in range(400):
        answer = requests.get(base + RECS + f"full-{i}-{'x' * 200}", timeout=30)
        assert answer.status_code == 200 and answer.json()["ok"] is True
        if i % 20 == 19 and metric(base, "ccproxy_box_cache_degraded_total", reason="full"):
            break
    wait_for(lambda: metric(base, "ccproxy_box_cache_degraded_total", reason="full") >= 1,
             seconds=30, what="the full box counted")
    # Each worker still caches what it fetched, in its own memory.
    hit = wait_for(lambda: (r := requests.get(base + RECS + "full-0-" + "x" * 200, timeout=30)).headers[
        "X-Cache"] == "HIT" and r, what="a hit while the box is full")
    assert hit.status_code == 200


# The store itself, as two worker processes of one box see it: two BoxStores on one file.

def two_workers(tmp_path, clock, **kwargs):
    from proxy.box_cache import BoxStore, prepare
    from proxy.cache import AnswerCache, MemoryStore

    path = str(tmp_path / "box.sqlite3")
    prepare(path)
    stores = [BoxStore(path, MemoryStore(100, clock), clock, **kwargs) for _ in range(2)]
    caches = [AnswerCache(store, clock, coalesce_wait=0.5, grace=0, max_stale=600) for store in stores]
    return stores, caches


def answer(data):
    from proxy.clients.base import Answer

    return Answer(data)


def test_ttl_is_kept_across_workers_and_stale_if_error_too(tmp_path):
    from conftest import FakeClock

    from proxy.errors import UpstreamUnavailable

    clock = FakeClock()
    (_a, _b), (first, second) = two_workers(tmp_path, clock)
    assert first.fetch("k", lambda: answer({"v": 1}), lambda _v: 60).state == "MISS"
    clock.advance(59)
    hit = second.fetch("k", lambda: answer({"v": 2}), lambda _v: 60)
    assert (hit.state, hit.value.data, round(hit.age)) == ("HIT", {"v": 1}, 59)  # the first worker's age
    clock.advance(2)  # expired in both workers at once

    def down():
        raise UpstreamUnavailable("amplitude", "down")

    stale = second.fetch("k", down, lambda _v: 60)  # stale-if-error from the box's entry
    assert (stale.state, stale.value.data) == ("STALE", {"v": 1})
    fresh = second.fetch("k", lambda: answer({"v": 3}), lambda _v: 60)
    assert fresh.state == "MISS"
    assert first.fetch("k", down, lambda _v: 60).value.data == {"v": 3}  # the refresh, box-wide


def test_a_claim_of_a_dead_worker_is_taken_over_and_a_live_one_expires(tmp_path):
    from conftest import FakeClock

    clock = FakeClock()
    (a, b), _caches = two_workers(tmp_path, clock, lock_ttl=2.0)
    assert a.try_lock("k") is not None
    assert b.try_lock("k") is None  # held by a live process (this one)
    clock.advance(2.5)
    assert b.try_lock("k") is not None  # past its deadline: a hung holder loses it

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import sqlite3

    with sqlite3.connect(a.path) as conn:
        conn.execute("INSERT OR REPLACE INTO flights VALUES ('crashed', 't', ?, ?)",
                     (int(dead.stdout), clock() + 60))
    assert b.try_lock("crashed") is not None  # its holder died: no wait for the deadline


def test_a_full_store_degrades_without_errors(tmp_path):
    from conftest import FakeClock

    clock = FakeClock()
    (a, _b), (first, _second) = two_workers(tmp_path, clock)
    conn = a._connection()  # SQLite's own cap on this worker's connection stands for a full disk
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    for i in range(50):
        assert first.fetch(f"k{i}", lambda: answer({"v": "x" * 5000}), lambda _v: 60).state == "MISS"
    assert first.fetch("k0", lambda: answer({}), lambda _v: 60).state == "HIT"  # its own memory
    assert a.degraded.get("full", 0) >= 1 and not a.usable


def test_a_worker_that_never_used_an_unusable_store_still_reports_it(tmp_path):
    """/readyz can be answered by any worker: the probe finds the broken store before any lookup."""
    from conftest import FakeClock

    from proxy.box_cache import BoxStore
    from proxy.cache import MemoryStore

    clock = FakeClock()
    store = BoxStore("/dev/null/box-cache.sqlite3", MemoryStore(100, clock), clock)
    assert store.usable  # nothing tried yet
    assert store.probe() is False
    assert store.last_error and store.degraded


def test_a_miss_costs_three_statements_and_a_stored_entry_ends_the_claims(tmp_path):
    """Lookup, claim, entry: one statement each (bench/RESULTS.md, cheaper misses); writing the
    entry ends the key's claim in the same statement, so a waiting worker finds the entry and
    no claim is left behind."""
    from conftest import FakeClock

    clock = FakeClock()
    (a, b), (first, _second) = two_workers(tmp_path, clock)
    a._next_purge = float("inf")  # the once-a-second purge is not part of a miss
    traced: list[str] = []
    a._connection().set_trace_callback(traced.append)
    assert first.fetch("k", lambda: answer({"v": 1}), lambda _v: 60).state == "MISS"
    # SQLite traces a statement again as each trigger of it starts: count each statement once.
    statements = [s for i, s in enumerate(traced) if i == 0 or s != traced[i - 1]]
    assert [s.split()[0] for s in statements] == ["SELECT", "INSERT", "INSERT"]
    with __import__("sqlite3").connect(a.path) as conn:
        assert conn.execute("SELECT count(*) FROM flights").fetchone()[0] == 0
    assert b.try_lock("k") is None  # a fresh entry: no claim, no second upstream call
    clock.advance(61)
    assert b.try_lock("k") is not None  # expired: the next caller may claim it


def test_a_file_kept_from_another_boot_is_emptied_and_one_from_this_boot_is_kept(tmp_path):
    """Entries and pauses carry monotonic times, which restart at each boot: a named file that
    outlived a reboot would otherwise serve its entries as fresh for as long as the last boot
    ran, and keep an upstream paused as long."""
    import sqlite3

    from conftest import FakeClock

    from proxy.box_cache import BoxStore
    from proxy.box_limiter import BoxRateLimiter
    from proxy.cache import AnswerCache, MemoryStore
    from proxy.guards import RateLimiter

    clock = FakeClock()

    def box_paused(store: BoxStore) -> bool:
        return BoxRateLimiter("amplitude", 60, store, RateLimiter("amplitude", 30, clock)).state["paused"]

    (a, _b), (first, _second) = two_workers(tmp_path, clock)
    assert first.fetch("k", lambda: answer({"v": 1}), lambda _v: 3600).state == "MISS"
    BoxRateLimiter("amplitude", 60, a, RateLimiter("amplitude", 30, clock)).pause(3600)

    def restarted() -> tuple[BoxStore, AnswerCache]:  # a new process on the same file
        store = BoxStore(a.path, MemoryStore(100, clock), clock)
        return store, AnswerCache(store, clock, coalesce_wait=0.5, grace=0, max_stale=600)

    store, cache = restarted()  # same boot: the file is trusted
    assert cache.fetch("k", lambda: answer({"v": 2}), lambda _v: 3600).value.data == {"v": 1}
    assert box_paused(store)

    with sqlite3.connect(a.path) as conn:  # as if the clock had been read a day into another boot
        assert conn.execute("UPDATE clock SET monotonic = monotonic + 86400").rowcount == 1
    store, cache = restarted()
    fetched = cache.fetch("k", lambda: answer({"v": 3}), lambda _v: 3600)
    assert (fetched.state, fetched.value.data) == ("MISS", {"v": 3})
    assert not box_paused(store)
    with sqlite3.connect(a.path) as conn:
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1  # the new entry only
