"""Slow and abusive clients against `ccproxy serve` on loopback: how soon a normal client is
answered while a flood of connections holds the server, and the Braze burst beside it.

    .venv/bin/python bench/slowloris.py [--connections 10000] [--attacks headers,body,unread]
                                        [--max-connections 500] [--workers 2] [--burst]
                                        [--compare DIR]
    .venv/bin/python bench/slowloris.py --port PORT [...]   # against a proxy already running

--compare DIR runs another checkout's proxy beside this one (e.g. main's:
`git archive main | tar -x -C DIR`), each flood and burst alternating between the two, so
both are measured under the same load of this shared machine.

Starts the sandbox Amplitude upstream and the proxy as `ccproxy serve` runs it (unless
--port), warms one cached answer, then for each attack opens `--connections` sockets at
once and has each one:

- headers: send half a request line and never finish it (slowloris);
- body: send a write's headers whole, then 5 bytes of its body, and stop (a slow POST);
- unread: pipeline requests for /openapi.json (54 KB each) with a 4 KB receive buffer and
  read nothing, so the server's writes block (each pinned socket costs the server about
  3 MB of answers first, so this flood is CPU-bound long before it is slot-bound).

During each flood a normal client opens fresh connections for /healthz and a cached
/v1/amplitude/properties answer, alternately; each figure splits the connect time (the
kernel's accept queue: a dropped SYN is retried after 1 s, then 3 s, 7 s) from the time to
the answer. The same probes without a flood, in the same run, are the baseline. The
machine's load (`uptime`) is printed with each figure; kernel counters ListenOverflows
(machine-wide) tell whether the accept queue overflowed. With --burst: 500 connections
on a 1 s upstream, Braze's 2 s timeout (wrk, as bench/run.py measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Processes, set_latency, start_amplitude_and_proxy, wait_up, wrk  # noqa: E402

CACHED = "/v1/amplitude/properties?user_id=bench-flood"
ACTIVITY = b'{"$type": "TOUCH", "$ts": 1735689600000, "$user_identifiers": []}'
PAYLOADS = {
    "headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    "body": (b"POST /v1/mediarithmics/activities HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(ACTIVITY)) + ACTIVITY[:5],
    "unread": b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 100,
}


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__().replace("'", "")


def listen_overflows() -> int:
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["ListenOverflows"])


def probe(port: int, path: str) -> dict:
    """One request on a fresh connection: connect time, time to the whole answer, status."""
    started = time.perf_counter()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
    except OSError as exc:
        return {"path": path, "error": type(exc).__name__, "total_s": time.perf_counter() - started}
    connected = time.perf_counter()
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    except OSError as exc:
        status = 0
        answer = type(exc).__name__.encode()
    finally:
        s.close()
    done = time.perf_counter()
    return {"path": path, "status": status, "connect_s": round(connected - started, 4),
            "total_s": round(done - started, 4)}


def open_flood(port: int, count: int, attack: str) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.socket()
        if attack == "unread":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        held.append(s)
    return held


def send_payloads(held: list[socket.socket], attack: str) -> None:
    for s in held:
        try:
            s.send(PAYLOADS[attack])
        except OSError:
            pass


def closed_by_server(held: list[socket.socket]) -> int:
    closed = 0
    for s in held:
        try:
            while True:  # an unread-answer socket holds answers before the end of the stream
                data = s.recv(1 << 20)
                if not data:
                    closed += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def closed_reasons(base: str) -> dict[str, float]:
    text = requests.get(f"{base}/metrics", timeout=30).text
    reasons = {}
    for line in text.splitlines():
        if line.startswith("ccproxy_connections_closed_total{"):
            reasons[line.split('reason="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return reasons


def probing(port: int, seconds: float, into: list[dict]) -> threading.Thread:
    """A normal client, one fresh connection after another, for `seconds` (in a thread)."""
    def run() -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            into.append(probe(port, "/healthz" if i % 2 == 0 else CACHED))
            i += 1
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def flood(base: str, port: int, attack: str, count: int, seconds: float) -> dict:
    overflows = listen_overflows()
    before = closed_reasons(base)
    during: list[dict] = []
    started = time.monotonic()
    prober = probing(port, seconds, during)  # from the flood's first connection on
    held = open_flood(port, count, attack)
    opened = time.monotonic() - started
    time.sleep(1)  # the connections complete (or sit in the kernel's queue)
    send_payloads(held, attack)
    load_during = load()
    prober.join()
    closed = closed_by_server(held)
    for s in held:
        s.close()
    after = closed_reasons(base)
    return {"attack": attack, "connections": count, "opened_s": round(opened, 2), "load": load_during,
            "probes": during, "closed_by_server": closed,
            "closed_by_reason": {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)},
            "listen_overflows": listen_overflows() - overflows}


def summary(result: dict) -> str:
    answered = [p for p in result["probes"] if p.get("status") == 200]
    failed = len(result["probes"]) - len(answered)
    totals = sorted(p["total_s"] for p in answered)
    connects = [p["connect_s"] for p in answered]
    if not totals:
        return f"| {result['attack']} | {result['connections']} | none of {failed} answered | | | | |"
    return (f"| {result['attack']} | {result['connections']} | {len(answered)} ({failed} failed) "
            f"| {result['probes'][0]['total_s']:.3f} | {totals[len(totals) // 2]:.3f} / {totals[-1]:.3f} "
            f"({max(connects):.3f}) | {sum(t > 1 for t in totals)} | {result['closed_by_server']} "
            f"| {result['listen_overflows']} | {result['load']} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port_arg", nargs="?", type=int, help=argparse.SUPPRESS)  # the old positional form
    parser.add_argument("count_arg", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--attacks", default="headers,body,unread")
    parser.add_argument("--unread-connections", type=int, default=300)
    parser.add_argument("--max-connections", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--burst-rounds", type=int, default=2, help="alternating: ABBA...")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the normal client probes")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another checkout (e.g. main's) whose proxy runs beside, probed alternately")
    args = parser.parse_args()
    port = args.port or args.port_arg
    count = args.count_arg or args.connections
    procs = Processes()
    env = {"CCPROXY_MAX_CONNECTIONS": str(args.max_connections),
           "CCPROXY_REQUEST_DEADLINE": "1.9", "CCPROXY_UPSTREAM_READ_TIMEOUT": "1.8"}
    try:
        servers: list[tuple[str, str | None, int]] = []
        if port is not None:
            servers.append(("running", None, port))
        else:
            servers.append(("this tree", *start_amplitude_and_proxy(procs, args.workers, env)))
            if args.compare:
                servers.append((args.compare.name, *start_amplitude_and_proxy(procs, args.workers, env,
                                                                              args.compare.resolve())))
        results: dict = {"servers": {}}
        print("| server | attack | connections | normal client answers | first answer s | p50 / max s "
              "(max connect) | answers over 1 s | closed by the server | listen overflows | load (1/5/15 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label, _sandbox, server_port in servers:
            base = f"http://127.0.0.1:{server_port}"
            wait_up(base + "/healthz")
            for _ in range(4 * args.workers):  # cached in every worker (each has its own cache)
                requests.get(base + CACHED, timeout=10)
            baseline: list[dict] = []
            probing(server_port, args.seconds, baseline).join()
            results["servers"][label] = {"baseline": {"load": load(), "probes": baseline}, "floods": []}
            print(f"| {label} " + summary({"attack": "none (baseline)", "connections": 0, "closed_by_server": "-",
                                           "listen_overflows": "-", "load": load(), "probes": baseline}))
        for attack in filter(None, args.attacks.split(",")):
            for label, _sandbox, server_port in servers:
                result = flood(f"http://127.0.0.1:{server_port}", server_port, attack,
                               args.unread_connections if attack == "unread" else count, args.seconds)
                results["servers"][label]["floods"].append(result)
                print(f"| {label} " + summary(result))
                print(f"  closed by reason: {result['closed_by_reason']}", file=sys.stderr)
                time.sleep(5)
        if args.burst:
            print("\n| server | Braze burst: 500 conns, upstream 1 s, 10 s | load (1/5/15 min) |\n|---|---|---|")
            for round_ in range(args.burst_rounds):
                for label, sandbox, server_port in servers[::-1] if round_ % 2 else servers:
                    if sandbox is None:
                        continue
                    set_latency(sandbox, 1.0)
                    burst_load = load()
                    burst = wrk(f"http://127.0.0.1:{server_port}", "miss.lua", 500, 10, timeout="2s")
                    results["servers"][label].setdefault("bursts", []).append({**burst, "load": burst_load})
                    print(f"| {label} | {burst['requests']} answers, p50 {burst['p50_ms']:.0f} ms, p99 "
                          f"{burst['p99_ms']:.0f} ms, max {burst['max_ms']:.0f} ms, errors {burst['errors']} "
                          f"(timeouts {burst['timeouts']}), non-2xx {burst['non_2xx']}, {burst['rps']:.0f}/s "
                          f"| {burst_load} |")
        print("JSON " + json.dumps(results))
    finally:
        procs.stop()


if __name__ == "__main__":
    os.chdir(HERE.parent)
    main()
