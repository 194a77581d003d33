"""`ccproxy serve` answers its keep-alive connections in turn: a connection whose next
requests are already waiting cannot hold a worker while another connection's request waits
(issue 15; proxy.serving.fair_worker_class). Order of answers, read from the access log,
not speed."""

from __future__ import annotations

import json
import socket
import threading

from servers import wait_for

PIPELINED = 2000


def _request(request_id: str) -> bytes:
    return f"GET /healthz HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: {request_id}\r\n\r\n".encode()


def _answer(reader) -> int:
    """Read one whole answer from the connection's file; its status."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    reader.read(length)
    return status


def _drain(reader, answers: list[int]) -> None:
    """Read the pipelined connection's answers as they come (so the worker never waits on a
    full socket buffer, which would make it yield whatever the scheduling)."""
    for _ in range(PIPELINED):
        assert _answer(reader) == 200
        answers[0] += 1


def _served_order(output: str) -> list[str]:
    ids = []
    for line in output.splitlines():
        if '"request_id"' in line and '"/healthz"' in line:
            try:
                ids.append(json.loads(line[line.index("{"):])["request_id"])
            except (ValueError, KeyError):
                continue
    return ids


def test_a_connection_with_requests_waiting_does_not_hold_the_worker(servers):
    # One worker, so both connections are its own; INFO writes one access log line per answer, in order.
    server = servers.start(["serve", "--no-auth", "--workers", "1"], {"CCPROXY_LOG_LEVEL": "INFO"})
    host, port = server.base.rsplit("/", 1)[1].split(":")
    waiting = socket.create_connection((host, int(port)))
    greedy = socket.create_connection((host, int(port)))
    for sock in (waiting, greedy):
        sock.settimeout(60)
    readers = {waiting: waiting.makefile("rb"), greedy: greedy.makefile("rb")}
    answers = [0]
    try:
        # Both connections accepted and served once, so each is kept alive by its own greenlet.
        for sock, name in ((waiting, "warm-waiting"), (greedy, "warm-greedy")):
            sock.sendall(_request(name))
            assert _answer(readers[sock]) == 200
        threading.Thread(target=_drain, args=(readers[greedy], answers), daemon=True).start()
        # Hundreds of requests in one write: all in the worker's buffer before it answers the first.
        greedy.sendall(b"".join(_request(f"greedy-{i:04d}") for i in range(PIPELINED)))
        # The other connection's request arrives once the worker is answering the pipelined ones.
        wait_for(lambda: answers[0] >= 1, seconds=60, poll=0.001, what="the first pipelined answer")
        waiting.sendall(_request("the-waiting-one"))
        assert _answer(readers[waiting]) == 200
        wait_for(lambda: answers[0] >= PIPELINED, seconds=60, what="every pipelined answer")
        order = _served_order(wait_for(
            lambda: server.output() if f"greedy-{PIPELINED - 1:04d}" in server.output() else "",
            seconds=30, what="the access log of the last answer"))
    finally:
        for sock in (waiting, greedy):
            readers[sock].close()
            sock.close()
    greedy_order = [i for i in order if i.startswith("greedy-")]
    assert greedy_order == [f"greedy-{i:04d}" for i in range(PIPELINED)]
    position = order.index("the-waiting-one") - order.index("greedy-0000")
    # Before issue 15 the worker answered every pipelined request first (position PIPELINED).
    assert position < PIPELINED // 2, f"answered after {position} of the other connection's requests"
