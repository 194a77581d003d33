"""The outbox under `ccproxy serve` when things go wrong around it: a locked file, a starved
or frozen worker, a stop in the middle of a slow delivery. Real gunicorn processes, the
sandbox over loopback, the outbox's real SQLite file."""

from __future__ import annotations

import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
import test_write_safety
import test_write_safety_serve
from servers import wait_for
from test_write_safety_serve import ACTIVITIES, activity, session

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
