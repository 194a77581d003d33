"""What a cache miss costs against a cache hit, in the workers' own CPU (issue 15, cheaper misses).

    .venv/bin/python bench/miss_cost.py [--compare DIR] [--rounds 3] [--seconds 6] [--workers 2]

Requests per second on a shared 2-core machine move with whatever else runs; the CPU the
proxy's workers spend per answer (utime + stime from /proc, over a wrk run) moves far less,
and it is what sets the throughput once the machine is full. So: `ccproxy serve` on an nginx
upstream answering fixed JSON after 20 ms (bench/saturation.py's), wrk at 256 connections on
cache hits (users already cached) and on misses (a new user per request), in alternating
rounds, and per answer: CPU microseconds of all workers, requests/s, p99. `--compare DIR` runs
another checkout's proxy (e.g. `git archive <rev> | tar -x -C DIR`) in the same rounds, so
the before/after ratios come from one run. In the same rounds, the floor of a miss: bare
Flask with and without one pooled upstream GET per request (bench/baseline.py --upstream),
whose difference is what the exchange alone costs. Writes its section of bench/RESULTS.md and prints it.
Needs wrk, nginx and libnginx-mod-http-echo (bench/run.sh installs them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, ROOT, Processes, cpu_seconds, free_port, wait_up, warm_keys, write_section, wrk  # noqa: E402
from saturation import PROXY_ENV, load_avg, require_tools, start_nginx  # noqa: E402

SECTION = "## Cheaper misses: CPU per answer (issue 15)"


def workers_of(master: int, count: int, seconds: float = 60) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        if len(pids) >= count:
            return [int(p) for p in pids]
        time.sleep(0.2)
    raise SystemExit(f"{count} workers of {master} did not start")


def measured(url: str, pids: list[int], script: str, seconds: int) -> dict:
    before = sum(cpu_seconds(p) for p in pids)
    run = wrk(url, script, 256, seconds)
    used = sum(cpu_seconds(p) for p in pids) - before
    return {**run, "cpu_us": used / max(1, run["requests"]) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compare", type=Path, default=None, help="another checkout's root, run beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    require_tools()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-miss-"))
    sources = {"this checkout": ROOT, **({f"{args.compare.name} (compared)": args.compare.resolve()}
                                         if args.compare else {})}
    started = time.monotonic()
    load = {"start": load_avg()}
    runs: dict[str, dict[str, list[dict]]] = {name: {"hit": [], "miss": []} for name in sources}
    floors: dict[str, list[dict]] = {"bare": [], "passthrough": []}  # bench/baseline.py, the floor
    try:
        upstream = start_nginx(procs, tmp, 0.02)
        servers = {}
        for name, source in sources.items():
            port = free_port()
            master = procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(port),
                                  "--workers", str(args.workers)], {**PROXY_ENV, "CCPROXY_AMPLITUDE_URL": upstream},
                                 cwd=source)
            url = f"http://127.0.0.1:{port}"
            wait_up(url + "/healthz")
            servers[name] = (url, workers_of(master.pid, args.workers))
            warm_keys(url, timeout=10)
            wrk(url, "hit.lua", 32, 3)  # every worker's memory warm, as in a send
        floor_servers = {}
        for name, extra in (("bare", []), ("passthrough", ["--upstream", upstream])):
            port = free_port()
            master = procs.start([PY, str(HERE / "baseline.py"), "--port", str(port),
                                  "--workers", str(args.workers), *extra])
            url = f"http://127.0.0.1:{port}"
            wait_up(url + "/healthz")
            floor_servers[name] = (url, workers_of(master.pid, args.workers))
        for _ in range(args.rounds):
            for kind in ("hit", "miss"):
                for name, (url, pids) in servers.items():
                    runs[name][kind].append(measured(url, pids, f"{kind}.lua", args.seconds))
            for name, (url, pids) in floor_servers.items():
                floors[name].append(measured(url, pids, "miss.lua", args.seconds))
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load["end"] = load_avg()
    report(runs, floors, load, args, round(time.monotonic() - started))


def report(runs: dict, floors: dict, load: dict, args, seconds: int) -> None:
    def med(name: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][kind])

    lines = [SECTION, "",
             f"Command: `.venv/bin/python bench/miss_cost.py{' --compare ' + str(args.compare) if args.compare else ''} "
             f"--rounds {args.rounds} --seconds {args.seconds} --workers {args.workers}` ({seconds} s). "
             f"`ccproxy serve`, {args.workers} workers, box cache on (the default); upstream: nginx + echo module, "
             "20 ms; wrk 2 threads, 256 connections; medians of alternating rounds. CPU per answer = the "
             "workers' utime + stime over the run / answers (what sets throughput once the machine is full; "
             f"steadier than req/s on a shared machine). {load['start']} at the start, {load['end']} at the end.", "",
             "| proxy | hit: CPU per answer | miss: CPU per answer | miss / hit CPU | hit req/s | miss req/s | "
             "miss / hit req/s | miss p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        hit_cpu, miss_cpu = med(name, "hit", "cpu_us"), med(name, "miss", "cpu_us")
        hit_rps, miss_rps = med(name, "hit", "rps"), med(name, "miss", "rps")
        errors = sum(r["errors"] + r["non_2xx"] for kind in ("hit", "miss") for r in runs[name][kind])
        lines.append(f"| {name} | {hit_cpu:.0f} us | {miss_cpu:.0f} us | {miss_cpu / hit_cpu:.2f}x | "
                     f"{hit_rps:.0f} | {miss_rps:.0f} | **{miss_rps / hit_rps:.2f}x** | "
                     f"{med(name, 'miss', 'p99_ms'):.0f} ms | {errors} |")
    if len(runs) == 2:
        this, other = list(runs)
        lines += ["", f"Miss CPU per answer, this checkout vs {other}: "
                  f"**{med(this, 'miss', 'cpu_us') / med(other, 'miss', 'cpu_us'):.2f}x**; hit: "
                  f"{med(this, 'hit', 'cpu_us') / med(other, 'hit', 'cpu_us'):.2f}x."]
    def floor(name: str, key: str) -> float:
        return statistics.median(r[key] for r in floors[name])

    this = next(iter(runs))
    exchange = floor("passthrough", "cpu_us") - floor("bare", "cpu_us")
    hit = med(this, "hit", "cpu_us")
    errors = sum(r["errors"] + r["non_2xx"] for name in floors for r in floors[name])
    lines += ["", "**The floor of a miss** (`bench/baseline.py`, the same rounds: Flask on gunicorn gevent, "
              f"{args.workers} workers, no fast lane, no cache, no metric): a bare `jsonify` costs "
              f"{floor('bare', 'cpu_us'):.0f} us of worker CPU per answer ({floor('bare', 'rps'):.0f} req/s); the "
              "same with one pooled urllib3 GET to the same nginx, its JSON decoded and encoded again, "
              f"{floor('passthrough', 'cpu_us'):.0f} us ({floor('passthrough', 'rps'):.0f} req/s; errors {errors}); "
              f"this checkout's misses answer at {med(this, 'miss', 'rps') / floor('passthrough', 'rps'):.2f}x "
              f"of that rate. The upstream exchange alone: **{exchange:.0f} us**. A miss costs at least a hit "
              f"and that exchange, so at this checkout's hit cost ({hit:.0f} us) misses can answer at most "
              f"**{hit / (hit + exchange):.2f}x** of the hit rate on the same CPU, before any cache, single "
              "flight, guard or metric (goal 0.5x)."]
    lines += ["", "Each run (CPU us per answer, req/s): " + "; ".join(
        f"{name} {kind}: " + ", ".join(f"{r['cpu_us']:.0f}/{r['rps']:.0f}" for r in runs[name][kind])
        for name in runs for kind in ("hit", "miss")) + "; " + "; ".join(
        f"floor {name}: " + ", ".join(f"{r['cpu_us']:.0f}/{r['rps']:.0f}" for r in floors[name])
        for name in floors) + ".", ""]
    section = "\n".join(lines)
    write_section(Path(args.out) / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
