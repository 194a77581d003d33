"""One cache per box (issue 15, point 4): the proxy with and without the box cache, side by side
in one run, so the figures are ratios measured together on a busy machine.

    .venv/bin/python bench/box_cache.py [--seconds 8] [--workers 2] [--runs 3]

Measures, for `ccproxy serve` with CCPROXY_BOX_CACHE on and off (same sandbox upstream):
hit and miss throughput (wrk, runs alternated on/off, medians), upstream calls for 30
identical cold requests and for a send after a warm-up through one connection, the cost of
one SQLite operation against a hop to gevent's thread pool, and the memory per entry per box.
Writes a section into bench/RESULTS.md below the marker that bench/run.py keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

import requests
from run import (
    AMPLITUDE_KEY,
    PY,
    ROOT,
    Processes,
    coalescing,
    free_port,
    machine,
    measure_memory,
    sandbox_calls,
    set_latency,
    wait_up,
    write_section,
    wrk,
)

HERE = Path(__file__).resolve().parent
SECTION = "## One cache per box (issue 15)"
ENTRIES = 20_000


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start_proxy(procs: Processes, sandbox: str, workers: int, box: bool) -> str:
    port = free_port()
    procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(port), "--workers", str(workers)],
                {"CCPROXY_AMPLITUDE_URL": sandbox, "CCPROXY_AMPLITUDE_SECRET_KEY": AMPLITUDE_KEY,
                 "CCPROXY_RATE_LIMIT_AMPLITUDE": "0", "CCPROXY_CACHE_TTL_RECOMMENDATIONS": "3600",
                 "CCPROXY_LOG_LEVEL": "WARNING", "CCPROXY_REQUEST_DEADLINE": "1.9",
                 "CCPROXY_UPSTREAM_READ_TIMEOUT": "1.8", "CCPROXY_BOX_CACHE": "true" if box else "false",
                 "CCPROXY_CACHE_MAXSIZE": str(ENTRIES * 2)})
    return f"http://127.0.0.1:{port}"


def send_after_warm(proxy: str, sandbox: str, users: int = 200) -> int:
    """Upstream calls a send makes (64 connections, each user 5 times) after every user was
    warmed through one connection, as `ccproxy warm` does."""
    tag = time.time_ns()
    urls = [f"{proxy}/v1/amplitude/recommendations?rec_id=testRecId&user_id=sent-{tag}-{i}" for i in range(users)]
    with requests.Session() as session:
        for url in urls:
            session.get(url, timeout=10).raise_for_status()
    before = sandbox_calls(sandbox)
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> int:
        return requests.get(url, timeout=10).status_code  # a new connection each: any worker

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert set(pool.map(one, urls * 5)) == {200}
    return sandbox_calls(sandbox) - before


def op_costs() -> dict:
    """Microseconds per box operation in a gevent-patched process, beside a hop to gevent's
    thread pool (what running each SQLite call off the event loop would add)."""
    code = """
from gevent import monkey; monkey.patch_all()
import json, os, tempfile, time, gevent
from proxy.box_cache import BoxStore, prepare
from proxy.cache import Entry, MemoryStore
from proxy.clients.base import Answer
from proxy.sandbox.amplitude import _recommendation, _user_data
d = tempfile.mkdtemp(dir='/dev/shm' if os.path.isdir('/dev/shm') else None); path = d + '/b.sqlite3'
prepare(path)
store = BoxStore(path, MemoryStore(100000), time.monotonic, 100000)
def data(who):
    return {'recommendations': [_recommendation(who, 'testRecId', None, False)], **_user_data(who, '')}
N = 3000
entries = [Entry(Answer(data(f'u{i}')), time.monotonic(), 300, 3600) for i in range(N)]
plain = MemoryStore(100000)
for i in range(N): plain.put(f'k{i}', entries[i])
def timed(fn):
    t = time.perf_counter()
    for i in range(N): fn(i)
    return (time.perf_counter() - t) / N * 1e6
put = timed(lambda i: store.put(f'k{i}', entries[i]))
read = timed(lambda i: store._read(f'k{i}'))
claim = timed(lambda i: store.unlock(f'c{i}', store.try_lock(f'c{i}')))
hits = {}
for round in range(5):  # alternated: the machine is busy
    for name, s in (('box', store), ('plain', plain)):
        hits.setdefault(name, []).append(timed(lambda i: s.get(f'k{i}')))
pool = gevent.get_hub().threadpool
hop = timed(lambda i: pool.apply(len, ('x',)))
local, plain_hit = min(hits['box']), min(hits['plain'])
print(json.dumps({'put_us': put, 'read_us': read, 'claim_release_us': claim, 'memory_hit_us': local,
                  'plain_memory_hit_us': plain_hit, 'threadpool_hop_us': hop}))
"""
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def box_file_bytes(proxy: str) -> tuple[int, int]:
    """(bytes of the box's files, entries in it)."""
    path = requests.get(proxy + "/readyz", timeout=10).json()["cache"]["box"]["path"]
    conn = sqlite3.connect(path, timeout=5)
    try:
        entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    finally:
        conn.close()
    size = sum(os.path.getsize(path + s) for s in ("", "-wal", "-shm") if os.path.exists(path + s))
    return size, entries


def fill(proxy: str, count: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def some(start: int) -> None:
        with requests.Session() as session:
            for i in range(start, count, 16):
                for _try in range(3):  # a busy machine may time a miss out: ask again
                    url = f"{proxy}/v1/amplitude/recommendations?rec_id=testRecId&user_id=fill{i}"
                    if session.get(url, timeout=10).status_code == 200:
                        break

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(some, range(16)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    started, load_before = time.monotonic(), uptime()
    procs = Processes()
    results: dict = {"runs": {}}
    try:
        sandbox_port = free_port()
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        procs.start([PY, "-m", "proxy.sandbox", "amplitude", "--port", str(sandbox_port),
                     "--workers", "1", "--latency", "0.02"])
        proxies = {"box": start_proxy(procs, sandbox, args.workers, True),
                   "per_worker": start_proxy(procs, sandbox, args.workers, False)}
        for url in (sandbox + "/__sandbox/stats", *(p + "/healthz" for p in proxies.values())):
            wait_up(url)
        # Upstream calls: counts, not speed.
        for name, proxy in proxies.items():
            results[f"cold30_{name}"] = coalescing(proxy, sandbox, {}, concurrency=30)
        set_latency(sandbox, 0.02)
        for name, proxy in proxies.items():
            results[f"send_after_warm_{name}"] = send_after_warm(proxy, sandbox)
        fill(proxies["box"], ENTRIES)
        results["box_bytes"], results["box_entries"] = box_file_bytes(proxies["box"])
        results["memory"] = measure_memory(ENTRIES)
        results["ops"] = op_costs()
        # Hit path, every worker warm in both (a first wrk run warms them), then alternated runs.
        for proxy in proxies.values():
            with requests.Session() as session:
                for i in range(1, 1001):
                    session.get(f"{proxy}/v1/amplitude/recommendations?rec_id=testRecId&user_id=warm{i}",
                                timeout=5).raise_for_status()
            wrk(proxy, "hit.lua", 64, 3)
        for scenario, script, conns in (("hit_64c", "hit.lua", 64), ("miss_64c", "miss.lua", 64),
                                        ("miss_256c", "miss.lua", 256)):
            for _run in range(args.runs):
                for name, proxy in proxies.items():
                    results["runs"].setdefault(f"{scenario}_{name}", []).append(
                        wrk(proxy, script, conns, args.seconds))
    finally:
        procs.stop()
    results["uptime_before"], results["uptime_after"] = load_before, uptime()
    report(results, args, Path(args.out), time.monotonic() - started)


def report(results: dict, args, out: Path, elapsed: float) -> None:
    def rps(key: str) -> float:
        return statistics.median(r["rps"] for r in results["runs"][key])

    def p99(key: str) -> float:
        return statistics.median(r["p99_ms"] for r in results["runs"][key])

    def errors(key: str) -> int:
        return sum(r["errors"] + r["non_2xx"] for r in results["runs"][key])

    rows = []
    for scenario, label in (("hit_64c", "cache hit, 64 connections"), ("miss_64c", "miss, 64 connections"),
                            ("miss_256c", "miss, 256 connections")):
        on, off = f"{scenario}_box", f"{scenario}_per_worker"
        rows.append(f"| {label} | {rps(on):,.0f} req/s, p99 {p99(on):.1f} ms | {rps(off):,.0f} req/s, "
                    f"p99 {p99(off):.1f} ms | **{rps(on) / rps(off):.2f}x** | {errors(on)} / {errors(off)} |")
    ops, memory = results["ops"], results["memory"]
    file_per_entry = results["box_bytes"] / max(1, results["box_entries"])
    local = memory["bytes_per_entry"]
    w = args.workers
    section = [
        SECTION, "",
        f"Command: `.venv/bin/python bench/box_cache.py --seconds {args.seconds} --runs {args.runs}` "
        f"({elapsed:.0f} s; two `ccproxy serve --workers {w}` side by side on one sandbox upstream answering "
        f"in 20 ms, one with `CCPROXY_BOX_CACHE=true` (the default), one with `false`; wrk runs of "
        f"{args.seconds} s alternated between the two, medians of {args.runs}). {machine()}.",
        f"Load: before `{results['uptime_before']}`; after `{results['uptime_after']}` (shared, busy machine: "
        "read the same-run ratios, not the absolute figures).", "",
        "| measure | box cache | per worker (before) | ratio | errors (box / per worker) |", "|---|---|---|---|---|",
        *rows, "",
        "| upstream calls | box cache | per worker (before) |", "|---|---|---|",
        f"| 30 identical cold requests at once (300 ms upstream) | {results['cold30_box']} | "
        f"{results['cold30_per_worker']} |",
        f"| a send (200 users x 5 calls, 64 connections) after warming every user through one connection | "
        f"{results['send_after_warm_box']} | {results['send_after_warm_per_worker']} |", "",
        "Each run (req/s, non-2xx answers, socket errors and timeouts):", "",
        *[f"- {key}: " + ", ".join(f"{r['rps']:,.0f} ({r['non_2xx']}, {r['errors']})" for r in runs)
          for key, runs in results["runs"].items()], "",
        f"One box operation, in a gevent-patched process on /dev/shm (µs, mean of 3,000, JSON "
        f"decoding and encoding included): read {ops['read_us']:.1f}, write (put) {ops['put_us']:.1f}, "
        f"single-flight claim + release {ops['claim_release_us']:.1f}; a hop to gevent's thread pool and "
        f"back, doing nothing, {ops['threadpool_hop_us']:.1f}. A memory hit through the box store "
        f"{ops['memory_hit_us']:.2f} against {ops['plain_memory_hit_us']:.2f} for the memory store alone "
        "(best of 5 alternated rounds): the hit path adds one freshness check and no SQLite call.", "",
        f"Memory per entry per box ({results['box_entries']:,} recommendation answers): the box file "
        f"(`/dev/shm`, WAL and index included) {file_per_entry:,.0f} bytes; a worker's memory copy "
        f"{local:,.0f} bytes (measured as in bench/run.py). Per box: {file_per_entry:,.0f} + "
        f"{local:,.0f} per worker that has read the entry, so {file_per_entry + w * local:,.0f} bytes "
        f"at most with {w} workers (before: {local:,.0f} per worker that fetched it, {w * local:,.0f} "
        f"at most, and as many upstream calls).", "",
    ]
    write_section(out / "RESULTS.md", SECTION, "\n".join(section))
    print("\n".join(section))


if __name__ == "__main__":
    main()
