"""Outbox drain rate: how many writes a second `ccproxy serve` delivers to a mediarithmics
sandbox that takes 50 ms to answer each write.

    .venv/bin/python bench/outbox_drain.py [--writes 3000] [--latency 0.05] [--workers 2] \
        [--concurrency 1,4,16,32]

For each concurrency it fills a fresh outbox with queued activities (one SQL transaction, so
filling is not what is measured), starts `ccproxy serve`, and times from the first delivery
to the last. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.outbox import Outbox  # noqa: E402
from proxy.sandbox import mediarithmics  # noqa: E402
from proxy.sandbox.base import SandboxState  # noqa: E402
from proxy.sandbox.server import RunningServer  # noqa: E402


def fill(path: str, count: int) -> None:
    Outbox(path)  # creates the schema
    now = time.time()
    body = {"$type": "TOUCH", "$ts": 1735689600000,
            "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "bench"}]}
    rows = [(uuid.uuid4().hex, "activity", "POST", "/v1/datamarts/1509/user_activities", "{}",
             json.dumps(body), now, now, 2, n + 1) for n in range(count)]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany("INSERT INTO writes (id, kind, method, path, query, body, state, next_attempt_at,"
                   " created_at, lane, seq) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    db.close()


def delivered(path: str) -> int:
    db = sqlite3.connect(path, timeout=5)
    try:
        return int(db.execute("SELECT COUNT(*) FROM writes WHERE state='delivered'").fetchone()[0])
    finally:
        db.close()


def run(sandbox_url: str, count: int, workers: int, concurrency: int, workdir: Path) -> float:
    path = str(workdir / f"outbox-{concurrency}.sqlite3")
    fill(path, count)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update({"CCPROXY_MEDIARITHMICS_URL": sandbox_url,
                "CCPROXY_MEDIARITHMICS_TOKEN": mediarithmics.DEFAULT_TOKEN,
                "CCPROXY_MEDIARITHMICS_DATAMART_ID": mediarithmics.DEFAULT_DATAMART,
                "CCPROXY_OUTBOX_PATH": path, "CCPROXY_OUTBOX_CONCURRENCY": str(concurrency),
                "CCPROXY_LOG_LEVEL": "WARNING", "CCPROXY_API_KEYS": "bench"})
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", "0",
                             "--workers", str(workers)], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = last = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = delivered(path)
            now = time.monotonic()
            if done and first is None:
                first = (now, done)
            if done >= count:
                last = (now, done)
                break
            time.sleep(0.05)
        if first is None or last is None:
            raise SystemExit(f"concurrency {concurrency}: not drained in time")
        return (last[1] - first[1]) / max(last[0] - first[0], 1e-6)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,16,32")
    args = parser.parse_args()
    app = mediarithmics.make_app(state=SandboxState())
    app.config["STORE"].write_latency = args.latency
    sandbox = RunningServer(app).start()
    print(f"| workers x concurrency | writes/s ({args.writes} writes, {args.latency * 1000:.0f} ms a write) "
          "| ceiling workers x concurrency / latency |")
    print("|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                rate = run(sandbox.url, args.writes, args.workers, concurrency, Path(workdir))
                ceiling = args.workers * concurrency / args.latency
                print(f"| {args.workers} x {concurrency} | {rate:.0f} | {ceiling:.0f} |", flush=True)
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
