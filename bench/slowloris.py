"""Slowloris against a running proxy on loopback: N connections that send half a request line
and never finish it, then a few /healthz calls timed, and how many of the N the server closed.

    .venv/bin/python bench/slowloris.py PORT [N]

Loopback only; it stops by itself (the connections are closed when it ends).
"""

from __future__ import annotations

import socket
import sys
import time

import requests


def main() -> None:
    port = int(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    held = []
    started = time.monotonic()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        held.append(s)
    time.sleep(1)
    for s in held:
        try:
            s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            pass
    print(f"opened {count} in {time.monotonic() - started:.2f} s")
    for _ in range(5):
        t = time.monotonic()
        try:
            answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
            print(f"/healthz {answer.status_code} in {time.monotonic() - t:.3f} s")
        except requests.RequestException as exc:
            print(f"/healthz failed ({type(exc).__name__}) after {time.monotonic() - t:.3f} s")
    closed = 0
    for s in held:
        try:
            if s.recv(10) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(f"closed by the server: {closed}")


if __name__ == "__main__":
    main()
