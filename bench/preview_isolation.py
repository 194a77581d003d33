"""Hit-path latency with and without four pathological Liquid previews running, in one run.

    .venv/bin/python bench/preview_isolation.py [--seconds 15] [--workers 2] [--rate 200]

Starts the sandbox Amplitude upstream and the proxy as `ccproxy serve` runs it (gevent
workers), warms cache entries in every worker, then measures cache hits on
/v1/amplitude/properties at a light, paced load (`--rate` requests a second over four
persistent connections): first alone, then while four clients keep posting pathological
previews (a triple-nested (1..1000) loop, a 90 KB template rendering past the output limit,
and two renders that only the time budget stops), then alone again. Prints a Markdown
table and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Processes, start_amplitude_and_proxy  # noqa: E402

KEYS = [f"/v1/amplitude/properties?user_id=bench-{i}" for i in range(50)]
NESTED = ("{% for a in (1..1000) %}{% for b in (1..1000) %}{% for c in (1..1000) %}x"
          "{% endfor %}{% endfor %}{% endfor %}")
HUGE_OUTPUT = "{% for a in (1..1000) %}" + "0123456789" * 9000 + "{% endfor %}"
ENDLESS = "{% for a in (1..40000) %}{% assign b = a | plus: 1 %}{% endfor %}" * 1500
PATHOLOGICAL = [NESTED, HUGE_OUTPUT, ENDLESS, ENDLESS]
CONNECTIONS = 4


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; client, proxy and "
            "upstream on the same machine")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def hits(port: int, seconds: float, rate: float) -> dict:
    """Paced GETs over CONNECTIONS keep-alive connections; latency of each in ms."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    interval = CONNECTIONS / rate

    def one_connection(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        end = time.monotonic() + seconds
        next_at = time.monotonic() + offset * interval / CONNECTIONS
        i = offset
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            try:
                conn.request("GET", KEYS[i % len(KEYS)])
                response = conn.getresponse()
                response.read()
                outcome = f"{response.status} {response.getheader('X-Cache')}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                statuses[outcome] += 1
            i += CONNECTIONS
            next_at += interval
        conn.close()

    threads = [threading.Thread(target=one_connection, args=(n,)) for n in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"requests": len(latencies), "statuses": dict(statuses),
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 2), "max_ms": round(max(latencies, default=0), 2)}


class Previews:
    """Four clients posting pathological previews back to back until stopped."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.outcomes: Counter = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(source,)) for source in PATHOLOGICAL]

    def _loop(self, source: str) -> None:
        body = json.dumps({"liquid": source})
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                conn.request("POST", "/v1/preview/liquid", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                error = answer.get("error", {})
                kind = error.get("message", "").split(":")[0] if response.status == 422 else error.get("code")
                label = f"{response.status} {kind}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                label = type(exc).__name__
            finally:
                conn.close()
            with self.lock:
                self.outcomes[label] += 1
            if label.startswith("503"):
                time.sleep(0.2)  # as Retry-After asks, roughly

    def __enter__(self) -> Previews:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200, help="hit requests a second (light load)")
    args = parser.parse_args()
    procs = Processes()
    results: dict[str, dict] = {}
    try:
        sandbox, proxy_port = start_amplitude_and_proxy(procs, args.workers)
        # Caches are per worker: a new connection per request (a kept-alive one sticks to one
        # worker), enough rounds that every worker holds every key.
        for _ in range(10):
            for key in KEYS:
                conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
                conn.request("GET", key)
                conn.getresponse().read()
                conn.close()
        results["alone"] = hits(proxy_port, args.seconds, args.rate)
        with Previews(proxy_port) as previews:
            time.sleep(1)  # every preview client is in flight
            results["with_previews"] = hits(proxy_port, args.seconds, args.rate)
        results["previews"] = dict(previews.outcomes)
        results["alone_after"] = hits(proxy_port, args.seconds, args.rate)
    finally:
        procs.stop()
    print(f"machine: {machine()}; {args.workers} workers, {args.rate:g} hits/s over {CONNECTIONS} "
          f"connections, {args.seconds:g} s per phase")
    print()
    print("| phase | hits | statuses | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for phase in ("alone", "with_previews", "alone_after"):
        r = results[phase]
        print(f"| {phase.replace('_', ' ')} | {r['requests']} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    print()
    print("previews answered:", ", ".join(f"{k}: {v}" for k, v in sorted(results["previews"].items())))
    print(json.dumps(results))


if __name__ == "__main__":
    os.chdir(HERE.parent)
    main()
