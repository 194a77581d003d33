"""Fair serving at saturation, open-loop latency and the miss path's own cost (issue 15).

    .venv/bin/python bench/saturation.py [--seconds 6] [--rounds 3]

One run, every server started side by side and measured in interleaved rounds (medians of
`--rounds`), because this 2-core machine is shared and its load moves:

- the proxy as `ccproxy serve` runs it (bench/serve_variant.py: `fair`), the same with
  gunicorn parsing every request (`CCPROXY_FAST_LANE=false`: serve before the fast lane), and
  without the yield between keep-alive answers (`unfair`, the worker before issue 15); each
  counts requests served per connection and connections per worker;
- bare Flask `jsonify` (bench/baseline.py) on gunicorn gevent, gunicorn gthread 2 x 8, and
  granian (a Rust HTTP server, WSGI on 8 blocking threads per worker);
- the proxy on granian with 256 blocking threads per worker (bench/granian_app.py), the
  alternative server measured for hits and the burst (not what `ccproxy serve` runs);
- the upstream: Debian's nginx with its echo module answering fixed JSON after 20 ms
  (`rec_id=slowRecId`: after 1 s, for the Braze burst), so the miss path's figures are the
  proxy's own cost, not a Python upstream's.

Closed loop (wrk) at 32 and 256 connections on cache hits, misses at 256, the Braze burst
(500 connections, 1 s upstream), then open loop (bench/openloop.py) at 50% and 80% of the
measured maximum for hits and misses. Writes its section of bench/RESULTS.md (below the
marker run.py keeps) and prints it. Needs wrk, nginx and libnginx-mod-http-echo (bench/run.sh
installs them) and granian (the bench extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, ROOT, Processes, free_port, wait_up, warm_keys, write_section, wrk  # noqa: E402

SECTION = "## Fair serving, open-loop latency, cheaper misses (issue 15)"
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
# Fixed JSON in the shape of Amplitude's user profile answer; only the ids are echoed back.
ANSWER = ('{"userData":{"recommendations":[{"rec_id":"$arg_rec_id","child_rec_id":"$arg_rec_id",'
          '"items":["cookie","cracker","chocolate milk","donut","croissant"],"is_control":false,'
          '"recommendation_source":"model","last_updated":1709993617}],"user_id":"$arg_user_id",'
          '"device_id":"ffff-ffff-ffff-ffff","amp_props":null,"cohort_ids":null}}')
NGINX_CONF = """load_module {module};
daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 75s;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  map $arg_rec_id $delay {{ default {latency}; slowRecId 1; }}
  server {{
    listen 127.0.0.1:{port};
    location /v1/userprofile {{ default_type application/json; echo_sleep $delay; echo '{answer}'; }}
  }}
}}
"""

PROXY_ENV = {"CCPROXY_AMPLITUDE_SECRET_KEY": "sandbox-amplitude-secret", "CCPROXY_RATE_LIMIT_AMPLITUDE": "0",
             "CCPROXY_CACHE_TTL_RECOMMENDATIONS": "3600", "CCPROXY_LOG_LEVEL": "WARNING",
             "CCPROXY_REQUEST_DEADLINE": "1.9", "CCPROXY_UPSTREAM_READ_TIMEOUT": "1.8"}
BARE_PATH = "/v1/amplitude/recommendations?user_id=u&rec_id=testRecId"
NAMES = {"proxy_fair": "proxy, `ccproxy serve` (gevent, fast lane, yields after each answer, accepts 16 a turn)",
         "proxy_no_lane": "proxy, the same with gunicorn parsing every request (`CCPROXY_FAST_LANE=false`)",
         "proxy_fair_accept1": "proxy, no fast lane, yields after each answer, accepts 1 a turn (gunicorn's)",
         "proxy_unfair": "proxy, gevent worker before issue 15 (no fast lane)",
         "proxy_granian": "proxy on granian WSGI 2 x 256 blocking threads (measured, not shipped)",
         "bare_gevent": "bare Flask, gunicorn gevent",
         "bare_gthread": "bare Flask, gunicorn gthread 2 x 8",
         "bare_granian": "bare Flask, granian WSGI 2 x 8 blocking threads"}


def load_avg() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"load average {one}, {five}, {fifteen}"


def start_nginx(procs: Processes, directory: Path, latency: float) -> str:
    """The non-Python upstream: nginx answering fixed JSON after `latency` s; its base URL."""
    port = free_port()
    (directory / "nginx.conf").write_text(NGINX_CONF.format(module=ECHO_MODULE, dir=directory, port=port,
                                                            latency=latency, answer=ANSWER))
    procs.start(["nginx", "-c", str(directory / "nginx.conf"), "-p", str(directory)])
    url = f"http://127.0.0.1:{port}"
    wait_up(url + "/v1/userprofile?rec_id=x&user_id=y")
    return url


def require_tools(*extra: str) -> None:
    """Stop, naming them, when wrk, nginx, its echo module or an `extra` path is missing."""
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if not Path(ECHO_MODULE).exists():
        missing.append("libnginx-mod-http-echo")
    missing += [Path(path).name for path in extra if not Path(path).exists()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (bench/run.sh installs them)")


def per_connection(path: Path) -> dict:
    """From the lines "pid requests" the counting workers wrote: requests per connection
    (min / median / max) and connections per worker."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    counts = sorted(int(n) for _, n in lines if int(n) > 0)
    workers = Counter(pid for pid, n in lines if int(n) > 0)
    if not counts:
        return {}
    return {"connections": len(counts), "min": counts[0], "median": statistics.median(counts),
            "max": counts[-1], "max_over_min": round(counts[-1] / max(1, counts[0]), 1),
            "per_worker": sorted(workers.values(), reverse=True)}


def openloop(url: str, rate: float, seconds: float, kind: str, connections: int) -> dict:
    out = subprocess.run([PY, str(HERE / "openloop.py"), url, "--rate", f"{rate:.0f}", "--seconds", str(seconds),
                          "--kind", kind, "--connections", str(connections)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])


def median_of(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=6, help="length of each closed-loop wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.02, help="nginx upstream delay on a miss")
    parser.add_argument("--open-seconds", type=float, default=8)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the section from the last run's saturation.json")
    args = parser.parse_args()
    if args.report:
        results = json.loads((Path(args.out) / "saturation.json").read_text(), object_hook=lambda d: {
            int(k) if k.isdigit() else k: v for k, v in d.items()})  # connection counts were int keys
        report(results, argparse.Namespace(**{**vars(args), **results.get("args", {})}))
        return
    require_tools()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-bench-"))
    started = time.monotonic()
    results: dict = {"load": {"before": load_avg()},  # other work on the machine, before ours
                     "args": {k: getattr(args, k) for k in ("seconds", "rounds", "workers", "latency")}}
    try:
        ports = {name: free_port() for name in NAMES}
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        url["nginx"] = start_nginx(procs, tmp, args.latency)
        env = {**PROXY_ENV, "CCPROXY_AMPLITUDE_URL": url["nginx"]}
        counts = {name: tmp / f"{name}.counts" for name in NAMES if name.startswith("proxy")}
        no_lane = {**env, "CCPROXY_FAST_LANE": "false"}
        for name, variant, variant_env in (("proxy_fair", "fair", env), ("proxy_no_lane", "fair", no_lane),
                                           ("proxy_fair_accept1", "fair_accept1", no_lane),
                                           ("proxy_unfair", "unfair", no_lane)):
            procs.start([PY, str(HERE / "serve_variant.py"), "--port", str(ports[name]), "--variant", variant,
                         "--workers", str(args.workers), "--counts", str(counts[name])], variant_env)
        procs.start([str(Path(PY).parent / "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
                     "--port", str(ports["proxy_granian"]), "--workers", str(args.workers), "--blocking-threads", "256",
                     "--no-access-log", "--log-level", "error", "--working-dir", str(HERE), "--factory",
                     "granian_app:load_app"], env)
        procs.start([PY, str(HERE / "baseline.py"), "--port", str(ports["bare_gevent"]), "--workers", str(args.workers)])
        procs.start([PY, str(HERE / "baseline.py"), "--port", str(ports["bare_gthread"]), "--workers", str(args.workers),
                     "--worker-class", "gthread", "--threads", "8"])
        procs.start([str(Path(PY).parent / "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
                     "--port", str(ports["bare_granian"]), "--workers", str(args.workers), "--blocking-threads", "8",
                     "--no-access-log", "--log-level", "warning", "--working-dir", str(HERE), "--factory",
                     "baseline:make_app"])
        for name in NAMES:
            wait_up(url[name] + "/healthz")
        # Every cache warm in every worker: the keys once, then 4 s of random hits on 32
        # connections (each key about ten times per worker).
        for name in (*counts, "proxy_granian"):
            warm_keys(url[name])
            wrk(url[name], "hit.lua", 32, 4)

        closed: dict[str, dict[int, list[dict]]] = {n: {32: [], 256: []} for n in (*NAMES, "miss_fair", "nginx")}
        spread: dict[str, dict[int, list[dict]]] = {name: {32: [], 256: []} for name in counts}
        results["load"]["closed_start"] = load_avg()
        for _ in range(args.rounds):
            for conns in (32, 256):
                for name in NAMES:
                    if name in counts:
                        counts[name].unlink(missing_ok=True)
                    if name.startswith("proxy"):
                        closed[name][conns].append(wrk(url[name], "hit.lua", conns, args.seconds))
                    else:
                        closed[name][conns].append(wrk(url[name] + BARE_PATH, "fixed.lua", conns, args.seconds))
                    if name in counts:
                        time.sleep(1)  # the workers write a connection's count once wrk has closed it
                        spread[name][conns].append(per_connection(counts[name]))
            closed["miss_fair"][256].append(wrk(url["proxy_fair"], "miss.lua", 256, args.seconds))
            closed["nginx"][256].append(wrk(url["nginx"], "upstream.lua", 256, args.seconds))
        results["load"]["closed_end"] = load_avg()
        results["closed"] = {n: {c: median_of(runs) for c, runs in by.items() if runs} for n, by in closed.items()}
        results["closed_runs"] = closed
        results["spread"] = spread

        results["load"]["burst"] = load_avg()
        results["burst"] = {name: wrk(url[name], "miss_slow.lua", 500, max(10, args.seconds), timeout="2s")
                            for name in (*counts, "proxy_granian")}

        results["load"]["open_start"] = load_avg()
        # The maximum, measured again just before (the machine's load moves): closed loop on the
        # same number of connections the open-loop generator uses.
        results["open_max"] = {"hit": wrk(url["proxy_fair"], "hit.lua", 64, args.seconds),
                               "miss": wrk(url["proxy_fair"], "miss.lua", 256, args.seconds)}
        hit_max, miss_max = results["open_max"]["hit"]["rps"], results["open_max"]["miss"]["rps"]
        opened = []
        for kind, top, conns in (("hit", hit_max, 64), ("miss", miss_max, 256)):
            for share in (0.5, 0.8):
                for name in ("proxy_fair", "proxy_unfair", "proxy_granian") if kind == "hit" else ("proxy_fair",):
                    run = openloop(url[name], top * share, args.open_seconds, kind, conns)
                    opened.append({"server": name, "kind": kind, "share": share, "connections": conns, **run})
        results["open"] = opened
        results["load"]["open_end"] = load_avg()
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started)
    report(results, args)


def report(results: dict, args) -> None:
    closed, load = results["closed"], results["load"]
    # Runs from before "before" was recorded: the closed-loop start, said to be so.
    before = load.get("before", load["closed_start"] + " (no earlier reading recorded; at the closed-loop start)")
    gthread = closed["bare_gthread"]
    best_bare = {c: max(closed[n][c]["rps"] for n in NAMES if n.startswith("bare")) for c in (32, 256)}
    best_name = {c: next(n for n in NAMES if n.startswith("bare") and closed[n][c]["rps"] == best_bare[c])
                 for c in (32, 256)}
    lines = [SECTION, "",
             f"Command: `.venv/bin/python bench/saturation.py --seconds {args.seconds} --rounds {args.rounds}` "
             f"({results['seconds']} s; part of `bench/run.sh`). {args.workers} workers each; wrk 2 threads; "
             f"medians of {args.rounds} interleaved rounds; proxy upstream: nginx + echo module, "
             f"{args.latency * 1000:.0f} ms (`slowRecId`: 1 s). The machine is shared: {before} before the "
             f"bench started anything; its own servers and wrk then count in the load ({load['closed_start']} "
             f"at the start of the closed-loop rounds, {load['closed_end']} at their end). Ratios are within "
             "this run; "
             + ("**other work was running (load above the core count before the bench): these figures need "
                "a quiet-machine rerun**." if float(before.split()[2].rstrip(",")) > (os.cpu_count() or 1)
                else "no other work was running (load below the core count before the bench)."), "",
             "### Cache hits, closed loop (wrk)", "",
             "| server | conns | req/s | p50 ms | p75 ms | p99 ms | p99.9 ms | max ms | p99 vs gthread | req/s vs best bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for conns in (32, 256):
        for name, label in NAMES.items():
            r = closed[name][conns]
            lines.append(f"| {label} | {conns} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p75_ms']:.2f} | "
                         f"**{r['p99_ms']:.2f}** | {r['p999_ms']:.1f} | {r['max_ms']:.0f} | "
                         f"{r['p99_ms'] / gthread[conns]['p99_ms']:.2f}x | {r['rps'] / best_bare[conns]:.2f}x |")
    lines += ["", f"Best bare configuration: {NAMES[best_name[32]]} at 32, {NAMES[best_name[256]]} at 256 connections. "
              "Errors: " + ", ".join(f"{n} {int(closed[n][c]['errors'])}" for n in NAMES for c in (32, 256)
                                     if closed[n][c]["errors"]) + ("" if any(closed[n][c]["errors"] for n in NAMES
                                                                        for c in (32, 256)) else "none") + ".", "",
              "### Why: requests served per connection in one wrk run (server-side counts; median over rounds)", "",
              "| proxy worker | conns | connections per worker, each round | requests per connection: min | median | max | max / min |",
              "|---|---|---|---|---|---|---|"]
    for conns in (32, 256):
        for name in ("proxy_unfair", "proxy_fair_accept1", "proxy_no_lane", "proxy_fair"):
            rounds = [s for s in results["spread"][name][conns] if s]
            if not rounds:
                continue
            med = {k: statistics.median(s[k] for s in rounds) for k in ("min", "median", "max", "max_over_min")}
            workers = " / ".join("+".join(str(w) for w in s["per_worker"]) for s in rounds)
            lines.append(f"| {NAMES[name]} | {conns} | {workers} | {med['min']:.0f} | {med['median']:.0f} | "
                         f"{med['max']:.0f} | **{med['max_over_min']:.1f}** |")
    miss, hit256, up = closed["miss_fair"][256], closed["proxy_fair"][256], closed["nginx"][256]
    lines += ["", "### Misses (256 connections, nginx upstream) and the Braze burst", "",
              "| measure | result | target | |", "|---|---|---|---|",
              f"| misses vs hits, `ccproxy serve`, 256 conns | {miss['rps']:.0f} vs {hit256['rps']:.0f} req/s = "
              f"**{miss['rps'] / hit256['rps']:.2f}x** (miss p50 {miss['p50_ms']:.1f} ms, p99 {miss['p99_ms']:.1f} ms) | "
              f">= 0.5x | {'met' if miss['rps'] / hit256['rps'] >= 0.5 else '**not met**'} |",
              f"| nginx upstream alone, 256 conns | {up['rps']:.0f} req/s, p50 {up['p50_ms']:.1f} ms | not the limit | |",
              *[f"| Braze burst: 500 conns, 1 s upstream, {NAMES[name]} | {b['requests']} answers, p50 "
                f"{b['p50_ms']:.0f} ms, p99 **{b['p99_ms']:.0f} ms**, max {b['max_ms']:.0f} ms, errors "
                f"{b['errors']}, non-2xx {b['non_2xx']} | all < 2 s, no error | "
                f"{'met' if b['errors'] == 0 and b['non_2xx'] == 0 and b['max_ms'] < 2000 else '**not met**'} |"
                for name, b in results["burst"].items()],
              "", f"Burst load: {load['burst']}.",
              "", "### Open loop: fixed arrival rate (bench/openloop.py, latency from each request's due time)", "",
              f"Maximum = closed-loop req/s of `ccproxy serve` measured just before: hits "
              f"{results['open_max']['hit']['rps']:.0f}/s on 64 connections, misses "
              f"{results['open_max']['miss']['rps']:.0f}/s on 256. "
              f"{load['open_start']} at the start, {load['open_end']} at the end.", "",
              "| server | path | rate (share of max) | answered | p50 ms | p99 ms | p99.9 ms | max ms | errors | generator CPU |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["open"]:
        lines.append(f"| {'`ccproxy serve`' if r['server'] == 'proxy_fair' else NAMES[r['server']]} | "
                     f"{r['kind']} | {r['rate']:.0f}/s ({r['share']:.0%}) | {r['answered']} of {r['sent']} | "
                     f"{r['p50_ms']:.2f} | **{r['p99_ms']:.2f}** | {r['p999_ms']:.1f} | {r['max_ms']:.0f} | "
                     f"{r['errors'] + r['non_200'] + r['unanswered']} | {r['generator_cpu_cores']:.2f} cores |")
    raw = {k: results[k] for k in ("closed", "spread", "burst", "open_max", "open", "load")}
    lines += ["", "<details><summary>Raw figures (medians; every run in bench/saturation.json)</summary>", "",
              "```json", json.dumps(raw, indent=1), "```", "", "</details>", ""]
    section = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "saturation.json").write_text(json.dumps(results, indent=1) + "\n")
    write_section(out / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
