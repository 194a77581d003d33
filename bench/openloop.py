"""An open-loop load generator: requests at a fixed arrival rate, whatever the server does.

Closed-loop wrk sends a connection's next request only after the previous answer, so a
server that stalls is sent less and its queueing never shows. Here request i is due at
start + i / rate; it goes out on the first idle keep-alive connection, and its latency is
counted from when it was DUE (like wrk2), so time spent waiting for a free connection is
counted too. One process, one epoll loop; it reports its own CPU use beside the figures.

    python bench/openloop.py URL_PREFIX --rate 3000 --seconds 10 --kind hit|miss [--connections 256]

Prints one JSON line: sent, answered, rate achieved, p50/p99/p99.9/max (ms), errors, non-200,
and the generator's own CPU (cores).
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import time
from collections import deque
from urllib.parse import urlsplit

STATUS_AT = len(b"HTTP/1.1 ")


class Conn:
    __slots__ = ("sock", "buf", "due")

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.due = 0.0


def answer_length(buf: bytes) -> int | None:
    """Bytes of the first whole answer in `buf` (headers and Content-Length body), or None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    at = head.find(b"content-length:")
    length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
    return head_end + 4 + length if len(buf) >= head_end + 4 + length else None


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


def run(url: str, rate: float, seconds: float, kind: str, connections: int, users: int = 1000,
        grace: float = 5.0) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tag = f"{time.time_ns()}-{random.randrange(1 << 30)}"

    def request(i: int) -> bytes:
        user = f"warm{random.randint(1, users)}" if kind == "hit" else f"open-{tag}-{i}"
        return (f"GET /v1/amplitude/recommendations?rec_id=testRecId&user_id={user} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n\r\n").encode()

    conns = [Conn(host, port) for _ in range(connections)]
    # One answer on each first, so the run measures requests, not connection set-up: a data
    # call, as Braze's connections make (a first /healthz sent each connection through
    # gunicorn's parser, before serve's workers took connections back to the fast lane).
    for c in conns:
        c.sock.setblocking(True)
        c.sock.sendall(f"GET /v1/amplitude/recommendations?rec_id=testRecId&user_id=warm1 HTTP/1.1\r\n"
                       f"Host: {host}:{port}\r\n\r\n".encode())
    for c in conns:
        while answer_length(c.buf) is None:
            c.buf += c.sock.recv(65536)
        c.buf = b""
        c.sock.setblocking(False)
    by_fd = {c.sock.fileno(): c for c in conns}
    idle = deque(conns)
    poller = select.epoll()
    for c in conns:
        poller.register(c.sock.fileno(), select.EPOLLIN)
    latencies: list[float] = []
    errors = non_200 = sent = 0
    backlog: deque[float] = deque()  # due times of requests waiting for a free connection
    cpu0, start = time.process_time(), time.monotonic()
    end, i = start + seconds, 0

    def send(conn: Conn, due: float) -> None:
        nonlocal sent, errors
        conn.due = due
        try:
            conn.sock.send(request(sent))
            sent += 1
        except OSError:
            errors += 1

    while True:
        now = time.monotonic()
        while i < rate * seconds and start + i / rate <= now:
            backlog.append(start + i / rate)
            i += 1
        while backlog and idle:
            send(idle.popleft(), backlog.popleft())
        if i >= rate * seconds and not backlog and len(idle) == len(conns):
            break
        if now > end + grace:
            break
        wait = (start + i / rate - now) if i < rate * seconds else 0.05
        for fd, _ in poller.poll(max(0.0, min(wait, 0.05))):
            conn = by_fd[fd]
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors += 1
                poller.unregister(fd)
                continue
            conn.buf += data
            length = answer_length(conn.buf)
            if length is None:
                continue
            if conn.buf[STATUS_AT:STATUS_AT + 3] != b"200":
                non_200 += 1
            conn.buf = conn.buf[length:]
            latencies.append(time.monotonic() - conn.due)
            if backlog:
                send(conn, backlog.popleft())
            else:
                idle.append(conn)
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu0
    for c in conns:
        c.sock.close()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {"rate": rate, "sent": sent, "answered": len(latencies), "unanswered": sent - len(latencies),
            "achieved_rps": round(len(latencies) / min(wall, seconds + grace), 1),
            "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "p999_ms": round(percentile(ms, 99.9), 3), "max_ms": round(ms[-1], 3) if ms else 0.0,
            "errors": errors, "non_200": non_200, "generator_cpu_cores": round(cpu / wall, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--kind", choices=("hit", "miss"), default="hit")
    parser.add_argument("--connections", type=int, default=256)
    args = parser.parse_args()
    print("JSON " + json.dumps(run(args.url, args.rate, args.seconds, args.kind, args.connections)))
