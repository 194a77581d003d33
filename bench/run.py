"""The proxy's benchmark: one command, every figure measured in the same run, as ratios to a
baseline measured alongside (these machines are noisy).

    .venv/bin/python bench/run.py            # writes bench/RESULTS.md and bench/latency.png

It starts the sandbox Amplitude upstream (gunicorn + gevent, configurable latency), the
proxy exactly as `ccproxy serve` runs it, and a bare Flask `jsonify` endpoint on the same
server settings, then drives them with wrk (Debian's package) through Lua scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
AMPLITUDE_KEY = "sandbox-amplitude-secret"
WARM_USERS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=0.5)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen:
        proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_amplitude_and_proxy(procs: Processes, workers: int, env: dict[str, str] | None = None,
                              source: Path = ROOT) -> tuple[str, int]:
    """The sandbox Amplitude upstream and `ccproxy serve --no-auth` wired to it, both up:
    the sandbox's URL and the proxy's port. `source`: the checkout whose proxy runs (another
    one, e.g. main's, for a comparison in the same run)."""
    sandbox_port, proxy_port = free_port(), free_port()
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    procs.start([PY, "-m", "proxy.sandbox", "amplitude", "--port", str(sandbox_port), "--workers", "1"])
    procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(proxy_port), "--workers", str(workers)],
                {"CCPROXY_AMPLITUDE_URL": sandbox, "CCPROXY_AMPLITUDE_SECRET_KEY": AMPLITUDE_KEY,
                 "CCPROXY_RATE_LIMIT_AMPLITUDE": "0", "CCPROXY_CACHE_TTL_PROPERTIES": "3600",
                 "CCPROXY_LOG_LEVEL": "WARNING", **(env or {})}, cwd=source)
    for url in (sandbox + "/__sandbox/stats", f"http://127.0.0.1:{proxy_port}/healthz"):
        wait_up(url)
    return sandbox, proxy_port


def wrk(url: str, script: str, connections: int, seconds: int, threads: int = 2,
        timeout: str = "5s", headers: dict[str, str] | None = None) -> dict:
    """Run wrk with a Lua script from bench/; its `done` prints one JSON line."""
    args = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s",
            f"--timeout={timeout}", "-s", str(HERE / script)]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    output = subprocess.run(args + [url], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    line = next(line for line in output.splitlines() if line.startswith("JSON "))
    return json.loads(line[5:])


def set_latency(sandbox: str, seconds: float) -> None:
    requests.post(f"{sandbox}/__sandbox/config", json={"latency": seconds}, timeout=5).raise_for_status()


def sandbox_calls(sandbox: str) -> int:
    return requests.get(f"{sandbox}/__sandbox/stats", timeout=5).json()["calls"]


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_memory(entries: int) -> dict:
    """RSS growth of a process holding `entries` cached recommendation answers, measured in
    a fresh interpreter so nothing else is in the way."""
    code = f"""
import json, gc, time
from proxy.cache import AnswerCache, MemoryStore, Entry
from proxy.clients.base import Answer, _DECODER
from proxy.sandbox.amplitude import _recommendation, _user_data
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
store = MemoryStore({entries} + 10)
gc.collect(); before = rss()
for i in range({entries}):
    who = f'user-{{i}}'
    data = {{'recommendations': [_recommendation(who, 'testRecId', None, False)],
             **_user_data(who, ''), 'amp_props': None, 'cohort_ids': None}}
    # Parsed from JSON by the client's own decoder, as a real answer is.
    value = Answer(_DECODER.decode(json.dumps({{'userData': data}}))['userData'])
    store.put(f'amplitude:abcd:userprofile?get_recs=true&rec_id=testRecId&user_id={{who}}',
              Entry(value, time.monotonic(), 300.0, 3600.0))
gc.collect(); after = rss()
# Each answer sent once: its bytes are kept on the cached answer (endpoints.Result.shaped).
from proxy.cache import Lookup
from proxy.endpoints import Result
from proxy.shape import amplitude as shape
for i in range({entries}):
    who = f'user-{{i}}'
    entry = store.get(f'amplitude:abcd:userprofile?get_recs=true&rec_id=testRecId&user_id={{who}}')
    Result.shaped(Lookup(entry.value, 'HIT', 0.0, 300.0), shape.recommendations, ['testRecId'], who, '').payload()
gc.collect(); served = rss()
print(json.dumps({{'before_kib': before, 'after_kib': after, 'served_kib': served, 'entries': len(store)}}))
"""
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result = json.loads(out)
    grown = (result["after_kib"] - result["before_kib"]) * 1024
    kept = (result["served_kib"] - result["after_kib"]) * 1024
    return {"entries": result["entries"], "mb": grown / 1e6, "bytes_per_entry": grown / entries,
            "sent_mb": (grown + kept) / 1e6, "sent_bytes_per_entry": (grown + kept) / entries}


def settled_calls(sandbox: str, quiet: float = 1.0, limit: float = 20.0) -> int:
    """The upstream's call count once it has stopped moving: requests of the run before (the
    burst) still queued in the proxy would otherwise be counted as this run's calls."""
    deadline, last = time.monotonic() + limit, sandbox_calls(sandbox)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sandbox_calls(sandbox)
        if now == last:
            break
        last = now
    return last


def coalescing(proxy: str, sandbox: str, headers: dict[str, str], concurrency: int = 200) -> int:
    """Upstream calls made for `concurrency` identical cold requests arriving together."""
    set_latency(sandbox, 0.3)
    before = settled_calls(sandbox)
    url = f"{proxy}/v1/amplitude/recommendations?rec_id=testRecId&user_id=coalesce-{time.time_ns()}"
    barrier = threading.Barrier(concurrency)

    def one(_):
        session = requests.Session()
        barrier.wait()
        return session.get(url, headers=headers, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        statuses = list(pool.map(one, range(concurrency)))
    assert set(statuses) == {200}, statuses
    return sandbox_calls(sandbox) - before


def load_average() -> str:
    """The machine's load (it is shared): printed beside the figures."""
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (f"{os.cpu_count()} cores ({cpu}), {int(mem) // 1024 // 1024} GiB, "
            f"Python {platform.python_version()}, {wrk_version.strip()}; load generator, proxy and "
            f"upstream on the same machine")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["bare", "hit", "upstream_1c", "miss_1c", "miss_256c", "burst_500c"]
    labels = ["bare Flask\n64 conns", "proxy hit\n64 conns", "upstream alone\n1 conn",
              "proxy miss\n1 conn", "proxy miss\n256 conns", "Braze burst\n500 conns, 1 s"]
    p50 = [results[n]["p50_ms"] for n in names]
    p99 = [results[n]["p99_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("connected-content-proxy latency by scenario")
    ax.legend()
    for x, b in enumerate(p99):
        ax.text(x + 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--latency", type=float, default=0.02, help="upstream latency on the miss path")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    out = Path(args.out)
    procs = Processes()
    started = time.monotonic()
    load_at_start = load_average()
    try:
        sandbox_port, proxy_port, bare_port, alt_port = free_port(), free_port(), free_port(), free_port()
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        proxy = f"http://127.0.0.1:{proxy_port}"
        bare = f"http://127.0.0.1:{bare_port}"
        # The upstream gets its own workers so it is not what limits the proxy.
        procs.start([PY, "-m", "proxy.sandbox", "amplitude", "--port", str(sandbox_port),
                     "--workers", "1", "--latency", str(args.latency)])
        procs.start([PY, "-m", "proxy.cli", "serve", "--no-auth", "--port", str(proxy_port),
                     "--workers", str(args.workers)],
                    {"CCPROXY_AMPLITUDE_URL": sandbox, "CCPROXY_AMPLITUDE_SECRET_KEY": AMPLITUDE_KEY,
                     "CCPROXY_RATE_LIMIT_AMPLITUDE": "0", "CCPROXY_CACHE_TTL_RECOMMENDATIONS": "3600",
                     "CCPROXY_LOG_LEVEL": "WARNING", "CCPROXY_REQUEST_DEADLINE": "1.9",
                     "CCPROXY_UPSTREAM_READ_TIMEOUT": "1.8"})
        procs.start([PY, str(HERE / "baseline.py"), "--port", str(bare_port), "--workers", str(args.workers)])
        # For comparison only: the same proxy on gthread workers (2 x 8 threads).
        alt = f"http://127.0.0.1:{alt_port}"
        procs.start([PY, str(HERE / "alt_server.py"), "--port", str(alt_port), "--workers", str(args.workers),
                     "--worker-class", "gthread", "--threads", "8"],
                    {"CCPROXY_AMPLITUDE_URL": sandbox, "CCPROXY_AMPLITUDE_SECRET_KEY": AMPLITUDE_KEY,
                     "CCPROXY_RATE_LIMIT_AMPLITUDE": "0", "CCPROXY_LOG_LEVEL": "WARNING",
                     "CCPROXY_REQUEST_DEADLINE": "1.9", "CCPROXY_UPSTREAM_READ_TIMEOUT": "1.8"})
        for url in (sandbox + "/__sandbox/stats", proxy + "/healthz", bare + "/healthz", alt + "/healthz"):
            wait_up(url)

        results: dict[str, dict] = {}
        results["bare"] = wrk(bare + "/v1/amplitude/recommendations?user_id=u&rec_id=testRecId",
                              "fixed.lua", 64, args.seconds)
        # Hit path: warm WARM_USERS keys, then request them at random.
        warm_keys(proxy)
        results["hit"] = wrk(proxy, "hit.lua", 64, args.seconds)
        # Miss path at 1 connection: the proxy against the upstream alone.
        results["upstream_1c"] = wrk(sandbox, "upstream.lua", 1, max(4, args.seconds // 2),
                                     headers={"Authorization": f"Api-Key {AMPLITUDE_KEY}"})
        results["miss_1c"] = wrk(proxy, "miss.lua", 1, max(4, args.seconds // 2))
        results["miss_256c"] = wrk(proxy, "miss.lua", 256, args.seconds)
        # Braze burst: 500 connections, 1 s upstream, Braze's 2 s timeout.
        set_latency(sandbox, 1.0)
        results["burst_500c"] = wrk(proxy, "miss.lua", 500, max(10, args.seconds), timeout="2s")
        results["coalesced_calls"] = {"calls": coalescing(proxy, sandbox, {})}
        # Last: a server with too few threads keeps calling the upstream after wrk stops.
        set_latency(sandbox, 1.0)
        results["burst_500c_gthread"] = wrk(alt, "miss.lua", 500, max(10, args.seconds), timeout="2s")
        results["memory"] = measure_memory(100_000)
        results["load"] = {"start": load_at_start, "end": load_average()}
    finally:
        procs.stop()

    report(results, args, out, time.monotonic() - started)


def report(results: dict, args, out: Path, elapsed: float) -> None:
    bare, hit = results["bare"], results["hit"]
    up, m1, m256, burst = results["upstream_1c"], results["miss_1c"], results["miss_256c"], results["burst_500c"]
    hit_ratio = hit["rps"] / bare["rps"]
    added_p50, added_p99 = m1["p50_ms"] - up["p50_ms"], m1["p99_ms"] - up["p99_ms"]
    miss_ratio = m256["rps"] / hit["rps"]
    burst_ok = burst["errors"] == 0 and burst["non_2xx"] == 0 and burst["max_ms"] < 2000
    memory = results["memory"]
    calls = results["coalesced_calls"]["calls"]

    def ok(flag: bool) -> str:
        return "met" if flag else "**not met**"

    rows = [
        ("hit path: requests/s vs bare Flask", f"{hit['rps']:.0f} vs {bare['rps']:.0f} = **{hit_ratio:.2f}x**",
         ">= 0.9x", ok(hit_ratio >= 0.9)),
        ("hit path p50 / p99", f"{hit['p50_ms']:.2f} / {hit['p99_ms']:.2f} ms (bare {bare['p50_ms']:.2f} / {bare['p99_ms']:.2f})",
         "", ""),
        (f"miss, 1 conn, upstream {args.latency * 1000:.0f} ms: added p50",
         f"{m1['p50_ms']:.2f} - {up['p50_ms']:.2f} = **{added_p50:.2f} ms**", "<= 2 ms", ok(added_p50 <= 2)),
        ("miss, 1 conn: added p99", f"{m1['p99_ms']:.2f} - {up['p99_ms']:.2f} = **{added_p99:.2f} ms**",
         "<= 10 ms", ok(added_p99 <= 10)),
        ("miss, 256 conns: requests/s vs hit path", f"{m256['rps']:.0f} vs {hit['rps']:.0f} = **{miss_ratio:.2f}x**",
         ">= 0.6x", ok(miss_ratio >= 0.6)),
        ("Braze burst: 500 conns, upstream 1 s", f"{burst['requests']} answers, p50 {burst['p50_ms']:.0f} ms, "
         f"p99 **{burst['p99_ms']:.0f} ms**, max {burst['max_ms']:.0f} ms, errors {burst['errors']}, "
         f"non-2xx {burst['non_2xx']}, {burst['rps']:.0f}/s", "all < 2 s, no error", ok(burst_ok)),
        ("same burst on gthread workers (2 x 8 threads), for comparison",
         f"{results['burst_500c_gthread']['requests']} answers, {results['burst_500c_gthread']['rps']:.0f}/s, "
         f"timeouts {results['burst_500c_gthread']['timeouts']}, p99 {results['burst_500c_gthread']['p99_ms']:.0f} ms",
         "(why gevent)", ""),
        (f"coalescing: 200 identical cold requests, {args.workers} workers", f"**{calls}** upstream call(s)",
         "1 per process", ok(calls <= args.workers)),
        ("memory: 100,000 cached recommendation entries",
         f"**{memory['mb']:.0f} MB** ({memory['bytes_per_entry']:.0f} bytes each)", "<= 200 MB", ok(memory["mb"] <= 200)),
        ("memory: the same entries once each was sent (its bytes kept with it)",
         f"**{memory['sent_mb']:.0f} MB** ({memory['sent_bytes_per_entry']:.0f} bytes each)",
         "reported: hit throughput wins over memory (issue 15)", ""),
    ]
    lines = [
        "# Benchmark results", "",
        f"Machine: {machine()}.", "",
        f"Command: `.venv/bin/python bench/run.py` ({elapsed:.0f} s; wrk runs of {args.seconds} s; "
        f"proxy and baseline on gunicorn + gevent, {args.workers} workers each). Load average (1, 5, 15 min) "
        f"{results['load']['start']} at the start, {results['load']['end']} at the end, on {os.cpu_count()} cores"
        + (": a busy machine, these figures need a quiet-machine rerun." if float(results["load"]["end"].split(",")[0])
           > (os.cpu_count() or 1) else "."), "",
        "| measure | result | target | |", "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
        "Raw figures (wrk):", "", "```json", json.dumps(results, indent=1), "```", "",
        "![latency by scenario](latency.png)", "",
    ]
    # Figures of the other bench scripts live below the marker and survive this rewrite.
    previous = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").exists() else ""
    kept = previous[previous.index(OTHER_BENCHES):] if OTHER_BENCHES in previous else ""
    (out / "RESULTS.md").write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    chart(results, out / "latency.png")
    print("\n".join(lines[:12 + len(rows)]))


OTHER_BENCHES = "<!-- other bench scripts: kept by run.py -->"


def warm_keys(proxy: str, timeout: float = 5) -> None:
    """Cache the WARM_USERS recommendation keys that bench/hit.lua asks for (in whichever
    worker takes each request: a few seconds of hit.lua then warms every worker)."""
    with requests.Session() as session:
        for i in range(1, WARM_USERS + 1):
            session.get(f"{proxy}/v1/amplitude/recommendations?rec_id=testRecId&user_id=warm{i}",
                        timeout=timeout).raise_for_status()


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (utime + stime from /proc, in clock ticks of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def write_section(path: Path, title: str, section: str) -> None:
    """Put another bench script's `section` (which starts with its `title` line) into
    RESULTS.md below run.py's own part: in place of its earlier one, else first there."""
    text = path.read_text() if path.exists() else ""
    if OTHER_BENCHES not in text:
        text += "\n" + OTHER_BENCHES + "\n"
    if title in text:
        begin = text.index(title)
        rest = text.find("\n## ", begin + len(title))
        text = text[:begin] + section + ("\n" + text[rest + 1:] if rest >= 0 else "")
    else:
        head, tail = text.split(OTHER_BENCHES, 1)
        text = head + OTHER_BENCHES + "\n" + section + tail
    path.parent.mkdir(parents=True, exist_ok=True)  # --out may name a new directory
    path.write_text(text)


if __name__ == "__main__":
    main()
