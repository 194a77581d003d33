"""The outbox under `ccproxy serve` when things go wrong around it: a locked file, a starved
or frozen worker, a stop in the middle of a slow delivery. Real gunicorn processes, the
sandbox over loopback, the outbox's real SQLite file."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import test_write_safety
import test_write_safety_serve
from servers import wait_for
from test_write_safety_serve import ACTIVITIES, activity, session, store_of, wait_delivered

# The fixtures, shared.
sandbox_writes = test_write_safety.sandbox_writes
serve = test_write_safety_serve.serve

RECS = "/v1/amplitude/recommendations?rec_id=testRecId&user_id="


def test_a_locked_outbox_is_a_prompt_503_and_never_delays_name_resolution(serve, sandboxes, tmp_path):
    # The upstream by host name: each new connection asks gevent's resolver, whose threads
    # the outbox once shared (a locked file held them all, and every read waited for DNS).
    amplitude = sandboxes.proxy_settings()["amplitude_url"].replace("127.0.0.1", "localhost")
    outbox = tmp_path / "outbox.sqlite3"
    base = serve(1, amplitude_url=amplitude).base
    lock = sqlite3.connect(outbox, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the file (a backup, a long migration)
    try:
        with ThreadPoolExecutor(100) as pool:
            def post(n: int) -> int | str:
                try:
                    r = session().post(base + ACTIVITIES, json=activity(f"locked-{n}"), timeout=10)
                except requests.RequestException as exc:  # no answer in 10 s: the request hung
                    return type(exc).__name__
                assert r.json()["error"]["code"] == "outbox_unavailable", r.text
                assert int(r.headers["Retry-After"]) >= 1
                return r.status_code

            posts = [pool.submit(post, n) for n in range(100)]
            # Some writes were refused: the outbox is contended now. A read needs DNS meanwhile.
            wait_for(lambda: sum(f.done() for f in posts) >= 10, seconds=60, what="first refusals")
            read = session().get(base + RECS + f"dns-{uuid.uuid4().hex[:8]}", timeout=10)
            answers = [f.result() for f in posts]
    finally:
        lock.rollback()
        lock.close()
    assert read.status_code == 200 and read.headers["X-Cache"] == "MISS", read.text
    assert answers == [503] * 100
    # The file is free again: the next write is stored.
    assert session().post(base + ACTIVITIES, json=activity("after"), timeout=10).status_code == 202


def test_a_clean_stop_during_a_slow_delivery_waits_for_it_so_it_is_never_sent_again(
        serve, sandboxes, sandbox_writes):
    sandbox_writes.slow_seconds, sandbox_writes.slow_count = 10.0, 1  # longer than 5 s
    first = serve(1)
    marker = uuid.uuid4().hex
    write_id = session().post(first.base + ACTIVITIES, json=activity(marker), timeout=10).json()["id"]
    wait_for(lambda: sandboxes.state("mediarithmics").calls >= 1, what="the delivery in flight")
    assert first.terminate() == 0  # SIGTERM: the worker waits for the delivery, then ends
    assert arrivals(sandboxes, marker) == 1
    # After the restart the write is known delivered: nothing is sent again.
    second = serve(1)
    done = wait_delivered(second.base, write_id, 60)
    assert done["attempts"] == 1
    assert arrivals(sandboxes, marker) == 1


def arrivals(sandboxes, marker: str) -> int:
    return [a.get("marker") for a in store_of(sandboxes).activities].count(marker)


def test_a_stop_right_after_a_worker_restarts_is_not_lost(serve):
    # The graceful period now covers a delivery (over 30 s): a SIGTERM that a just-forked
    # worker lost (before gunicorn installed its handlers) would keep it up all that time.
    server = serve(2)
    before = workers_of(server.pid)
    os.kill(min(before), signal.SIGKILL)
    wait_for(lambda: workers_of(server.pid) - before, poll=0.001, what="a new worker")
    assert server.terminate(timeout=25) == 0  # not SIGKILLed by the test after 25 s


def workers_of(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


def test_a_frozen_worker_s_delivery_is_never_started_again_by_the_other(
        serve, sandboxes, sandbox_writes, tmp_path):
    # The worst starvation: the sending worker stops running (SIGSTOP) for longer than the
    # 15 s lease, so its lease lapses, while its call to mediarithmics is still in flight.
    # Every write is slow: a second send, had there been one, would be recorded before its
    # outcome, so the write cannot be seen delivered before a duplicate would have landed.
    sandbox_writes.write_latency = 25.0
    base = serve(2).base
    marker = uuid.uuid4().hex
    write_id = session().post(base + ACTIVITIES, json=activity(marker), timeout=10).json()["id"]
    wait_for(lambda: sandboxes.state("mediarithmics").calls >= 1, what="the delivery in flight")
    owner = lease_of(tmp_path / "outbox.sqlite3", write_id)
    # host/namespace/pid/start/nonce (before: pid-nonce)
    sender = int(owner.split("/")[2] if "/" in owner else owner.split("-")[0])
    os.kill(sender, signal.SIGSTOP)
    try:
        # Past the lease, while the other worker polls the outbox several times a second
        # (or until the other worker took the write over: the failure this rules out).
        wait_for(lambda: lapsed_or_taken(tmp_path / "outbox.sqlite3", write_id, owner),
                 seconds=60, poll=0.2, what="the frozen worker's lease to lapse")
    finally:
        print("DEBUG", owner, read_row(tmp_path / "outbox.sqlite3", write_id), time.time(), sandboxes.state("mediarithmics").calls)
        os.kill(sender, signal.SIGCONT)
    done = wait_delivered(base, write_id, 60)
    print("DEBUG2", done, arrivals(sandboxes, marker), sandboxes.state("mediarithmics").calls, time.time())
    time.sleep(8)
    print("DEBUG3", arrivals(sandboxes, marker), sandboxes.state("mediarithmics").calls, time.time())
    assert done["attempts"] == 1
    assert arrivals(sandboxes, marker) == 1
    assert sum(1 for w in store_of(sandboxes).writes if w[3].get("marker") == marker) == 1


def lease_of(path: Path, write_id: str) -> str:
    return wait_for(lambda: read_row(path, write_id)[0], what="the write's lease")


def lapsed_or_taken(path: Path, write_id: str, owner: str) -> bool:
    holder, until = read_row(path, write_id)
    return holder != owner or (until or 0.0) < time.time() - 3


def read_row(path: Path, write_id: str) -> tuple:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT lease_owner, lease_until FROM writes WHERE id=?", (write_id,)).fetchone()
    finally:
        db.close()
