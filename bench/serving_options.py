"""The serving decision in numbers (issue 15): cache-hit throughput against the Braze burst,
for `ccproxy serve` and the alternatives on granian, side by side in one run.

    .venv/bin/python bench/serving_options.py [--rounds 2] [--seconds 6] [--threads 8,32,64,128,256]

granian runs a WSGI app on a fixed pool of blocking threads per worker: few threads serve
cache hits fastest, but every cache miss holds a thread while it waits on its upstream, so
the burst (500 connections on a 1 s upstream, every answer due within 2 s) needs about as
many threads as misses in flight. Measured here, 2 workers each, on bench/saturation.py's
nginx upstream:

- `ccproxy serve` (gunicorn + gevent: a greenlet per request);
- the proxy on granian WSGI with each `--threads` count (bench/granian_app.py);
- the proxy on granian RSGI, hits answered on the event loop and everything else in a pool
  of 256 threads per worker (bench/granian_rsgi_app.py: a prototype, not shipped);
- bare Flask `jsonify` on granian WSGI 2 x 8 threads, the best bare configuration of
  bench/saturation.py, as the throughput baseline.

Hits: wrk, 256 connections, medians of `--rounds` interleaved rounds. Burst: wrk, 500
connections, `rec_id=slowRecId` (nginx answers after 1 s), 2 s timeout. Writes its section of
bench/RESULTS.md and prints it. Needs wrk, nginx + echo module (bench/run.sh) and granian.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from run import HERE, PY, Processes, free_port, wait_up, warm_keys, write_section, wrk
from saturation import BARE_PATH, PROXY_ENV, load_avg, require_tools, start_nginx

SECTION = "## Serving options: cache-hit throughput against the Braze burst (issue 15)"
GRANIAN = str(Path(PY).parent / "granian")


def granian(procs: Processes, interface: str, target: str, port: int, threads: int, env: dict[str, str]) -> None:
    procs.start([GRANIAN, "--interface", interface, "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                 "--blocking-threads", str(threads), "--no-access-log", "--log-level", "error",
                 "--working-dir", str(HERE), "--factory", target], env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--threads", default="8,32,64,128,256", help="granian WSGI blocking threads to try")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    require_tools(GRANIAN)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-serving-"))
    started = time.monotonic()
    load = {"start": load_avg()}
    names: dict[str, str] = {"serve": "`ccproxy serve` (gunicorn + gevent)"}
    hits: dict[str, list[dict]] = {}
    bursts: dict[str, dict] = {}
    try:
        env = {**PROXY_ENV, "CCPROXY_AMPLITUDE_URL": start_nginx(procs, tmp, 0.02)}
        urls = {}
        port = urls["serve"] = free_port()
        procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(port), "--workers", "2"], env)
        for threads in (int(t) for t in args.threads.split(",")):
            name = f"wsgi_{threads}"
            names[name] = f"proxy on granian WSGI, 2 x {threads} threads"
            granian(procs, "wsgi", "granian_app:load_app", urls.setdefault(name, free_port()), threads, env)
        names["rsgi"] = "proxy on granian RSGI: hits on the event loop, the rest in 2 x 256 threads (prototype)"
        granian(procs, "rsgi", "granian_rsgi_app:load_app", urls.setdefault("rsgi", free_port()), 1, env)
        names["bare"] = "bare Flask on granian WSGI, 2 x 8 threads (the baseline)"
        granian(procs, "wsgi", "baseline:make_app", urls.setdefault("bare", free_port()), 8, {})
        base = {name: f"http://127.0.0.1:{port}" for name, port in urls.items()}
        for url in base.values():
            wait_up(url + "/healthz", 60)
        for name, url in base.items():
            if name != "bare":
                warm_keys(url, timeout=10)
                wrk(url, "hit.lua", 32, 3)  # every worker's memory warm
        for _ in range(args.rounds):
            for name, url in base.items():
                run = wrk(url + BARE_PATH, "fixed.lua", 256, args.seconds) if name == "bare" else \
                    wrk(url, "hit.lua", 256, args.seconds)
                hits.setdefault(name, []).append(run)
        load["burst"] = load_avg()
        for name, url in base.items():
            if name != "bare":
                bursts[name] = wrk(url, "miss_slow.lua", 500, max(10, args.seconds), timeout="2s")
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load["end"] = load_avg()
    report(names, hits, bursts, load, args, round(time.monotonic() - started))


def report(names: dict[str, str], hits: dict[str, list[dict]], bursts: dict[str, dict], load: dict,
           args: argparse.Namespace, seconds: int) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in hits[name])

    bare = med("bare", "rps")
    lines = [SECTION, "",
             f"Command: `.venv/bin/python bench/serving_options.py --rounds {args.rounds} --seconds {args.seconds} "
             f"--threads {args.threads}` ({seconds} s). 2 workers each; upstream nginx + echo module (20 ms; "
             f"`slowRecId`: 1 s). Hits: wrk 2 threads, 256 connections, medians of {args.rounds} interleaved rounds. "
             f"Burst: 500 connections, each request a new user on the 1 s upstream, 2 s timeout (Braze's). "
             f"{load['start']} at the start, {load['burst']} before the bursts, {load['end']} at the end.", "",
             "| server | hits/s | vs baseline | hit p99 | burst: answers | timeouts and errors | burst p99 | burst max | both targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, label in names.items():
        rps = med(name, "rps")
        burst = bursts.get(name)
        row = f"| {label} | {rps:,.0f} | **{rps / bare:.2f}x** | {med(name, 'p99_ms'):.0f} ms |"
        if burst is None:
            lines.append(row + " | | | | |")
            continue
        failed = burst["errors"] + burst["non_2xx"]
        held = failed == 0 and burst["max_ms"] < 2000
        lines.append(row + f" {burst['requests']:,} | {failed} | {burst['p99_ms']:,.0f} ms | "
                     f"{burst['max_ms']:,.0f} ms | {'yes' if held and rps / bare >= 0.9 else 'no'} "
                     f"({'burst held' if held else 'burst failed'}) |")
    lines += ["", "Targets (issue 15): hits >= 0.9x the best bare configuration, and every burst request "
              "answered within 2 s with no error.", ""]
    section = "\n".join(lines)
    write_section(Path(args.out) / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
