"""Slow and abusive clients (proxy/connections.py): unit tests of the guard's order of
shedding, and a two-worker `ccproxy serve` under thousands of half-open connections."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests
from servers import wait_for
from test_metrics import sample

from proxy.connections import (
    ACTIVE,
    BODY,
    IDLE,
    SEND,
    UNCHECKED_ANSWERS,
    UNCHECKED_BYTES,
    WAITING,
    ConnectionGuard,
    GuardedSocket,
)

KEY = "conn-test-key"


def pair(guard: ConnectionGuard) -> tuple[GuardedSocket, socket.socket]:
    server_side, client_side = socket.socketpair()
    return GuardedSocket(server_side, guard), client_side


def test_idle_connections_are_shed_first_then_the_oldest_waiting_never_an_active_one():
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=3)
    active, _c1 = pair(guard)
    with active.reading_request():
        pass  # headers read: its body next
    assert active.phase == BODY
    guard.move(active, ACTIVE, 10)  # being answered
    idle, _c2 = pair(guard)
    with idle.reading_request():
        pass
    guard.move(idle, IDLE, 75)  # answered, waiting for its next request
    waiting, _c3 = pair(guard)
    assert (active.phase, idle.phase, waiting.phase) == (ACTIVE, IDLE, WAITING)
    newest, _c4 = pair(guard)  # one over the cap: the idle one goes
    assert idle.phase == "" and idle.recv(10) == b"" and guard.shed_count == 1
    newer, _c5 = pair(guard)  # then the oldest still sending its headers
    assert waiting.phase == "" and newest.phase == WAITING and newer.phase == WAITING
    assert active.phase == ACTIVE and len(guard) == 3 and guard.shed_count == 2


def test_headers_have_their_own_deadline_and_a_keepalive_wait_its_own():
    guard = ConnectionGuard(header_timeout=0.2, keepalive_timeout=60, max_connections=10)
    conn, client = pair(guard)
    client.sendall(b"GET / HT")
    assert conn.recv(100) == b"GET / HT"
    time.sleep(0.3)
    client.sendall(b"TP/1.1\r\n")
    assert conn.recv(100) == b""  # too late: read as a hang-up
    assert guard.timed_out == 1
    kept, client2 = pair(guard)
    with kept.reading_request():
        pass
    with kept.reading_request():  # idle between requests: the keep-alive clock, not the header one
        time.sleep(0.3)
        client2.sendall(b"GET /next HTTP/1.1\r\n")
        assert kept.recv(100).startswith(b"GET /next")
        assert kept.phase == WAITING  # the next request began: its headers are due soon


def test_body_and_send_phases_are_shed_oldest_first_after_idle_ones_never_an_active_one():
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=4)
    body, _c1 = pair(guard)
    guard.move(body, BODY, 10)  # trickling its body since first
    active, _c2 = pair(guard)
    guard.move(active, ACTIVE, 10)  # waiting on an upstream
    send, _c3 = pair(guard)
    guard.move(send, SEND, 5)  # its client does not read the answer
    idle, _c4 = pair(guard)
    guard.move(idle, IDLE, 75)
    first, _c5 = pair(guard)  # over the cap: the idle one goes first
    assert idle.phase == "" and body.phase == BODY and send.phase == SEND
    second, _c6 = pair(guard)  # then the one that entered a client-paced phase first
    assert body.phase == "" and send.phase == SEND and first.phase == WAITING
    third, _c7 = pair(guard)  # then the send, older than the waiting newcomers
    assert send.phase == "" and first.phase == second.phase == third.phase == WAITING
    fourth, _c8 = pair(guard)  # the oldest newcomer, never the one just admitted
    assert first.phase == "" and fourth.phase == WAITING and active.phase == ACTIVE
    assert guard.closed == {"shed_idle": 1, "shed_body": 1, "shed_send": 1, "shed_waiting": 1}


def test_an_answer_the_client_does_not_read_fails_at_the_send_deadline():
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=0.3)
    conn, client = pair(guard)
    guard.move(conn, ACTIVE, 10)
    with pytest.raises(BrokenPipeError):
        conn.sendall(b"x" * 50_000_000)  # far more than the socket buffers; nobody reads
    assert guard.closed["send_timeout"] == 1
    client.close()


def tcp_pair(guard: ConnectionGuard, rcvbuf: int | None = None) -> tuple[GuardedSocket, socket.socket]:
    """A TCP connection (the kernel's unsent count is TCP's): (guarded server side, client)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.connect(listener.getsockname())
        server_side, _ = listener.accept()
    server_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gunicorn's sockets
    return GuardedSocket(server_side, guard), client


def unread_answer(guard: ConnectionGuard) -> tuple[GuardedSocket, socket.socket, socket.socket]:
    """A connection answered once with 50 kB its client has not read: (guarded, client, server side)."""
    conn, client = tcp_pair(guard, rcvbuf=4096)
    with conn.reading_request():
        pass
    guard.move(conn, ACTIVE, 10)
    conn.sendall(b"x" * 50_000)  # fits the kernel's buffers; the client reads none of it
    return conn, client, conn._sock


def test_the_next_request_waits_until_the_client_took_the_answer():
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=0.5)
    conn, client, server_side = unread_answer(guard)
    assert conn.phase == SEND
    with conn.reading_request():  # its next request is not read: the answer was never taken
        assert conn.phase == "" and conn.recv(10) == b""
    assert guard.closed["send_timeout"] == 1
    kept, client2 = pair(guard)
    with kept.reading_request():
        pass
    guard.move(kept, ACTIVE, 10)
    kept.sendall(b"answer")
    assert client2.recv(10) == b"answer"
    with kept.reading_request():  # taken: the next request is read on the keep-alive clock
        assert kept.phase == IDLE
    client.close()
    server_side.close()


def answered(conn: GuardedSocket, guard: ConnectionGuard, answer: bytes) -> bool:
    """One keep-alive request on `conn`: False when its head is not read (connection over)."""
    with conn.reading_request():
        if not conn.phase:
            return False
    guard.move(conn, ACTIVE, 10)
    conn.sendall(answer)
    return True


@pytest.fixture
def kernel_asks(monkeypatch) -> list[int]:
    """One item per time the kernel is asked whether a connection's answers were taken."""
    import proxy.connections as connections

    asked: list[int] = []
    real = connections._unsent
    monkeypatch.setattr(connections, "_unsent", lambda sock: asked.append(1) or real(sock))
    return asked


def test_the_kernel_is_asked_whether_answers_were_taken_once_their_bytes_add_up(kernel_asks):
    """A syscall per request was 5% of a cache hit: small answers are checked by the batch."""
    asked = kernel_asks
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=5)
    conn, client = tcp_pair(guard)
    answer = b"a" * 3000
    for _ in range(10):  # 30 kB in 10 answers: under UNCHECKED_BYTES and UNCHECKED_ANSWERS
        assert answered(conn, guard, answer)
        assert client.recv(len(answer), socket.MSG_WAITALL) == answer
    assert asked == []
    for _ in range(10):  # past the bytes: asked (all was taken), and the count starts again
        assert answered(conn, guard, answer)
        assert client.recv(len(answer), socket.MSG_WAITALL) == answer
    assert len(asked) == 1 and conn.unchecked < UNCHECKED_BYTES
    client.close()
    conn.close()


def test_a_client_that_reads_none_of_many_small_answers_is_still_stopped():
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=0.3)
    conn, client = tcp_pair(guard, rcvbuf=4096)
    answers = 0
    while answered(conn, guard, b"a" * 1000):  # the client asks again and again, reads nothing
        answers += 1
        assert answers < 10_000, "never stopped"
    assert guard.closed["send_timeout"] == 1 and conn.phase == ""
    # Its receive buffer (a few kB) and the unchecked allowance, not the server's send buffer.
    assert answers <= 4 * UNCHECKED_ANSWERS, answers
    client.close()


def test_answers_of_few_bytes_are_checked_by_their_count(kernel_asks):
    """HEAD answers and small errors are mostly work: a byte budget alone would let a client
    that reads nothing have hundreds rendered before the kernel is asked."""
    asked = kernel_asks
    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=5)
    conn, client = tcp_pair(guard)
    answer = b"HTTP/1.1 200 OK\r\n\r\n"
    for _ in range(5 * UNCHECKED_ANSWERS + 1):
        assert answered(conn, guard, answer)
        assert client.recv(len(answer), socket.MSG_WAITALL) == answer
    assert len(asked) == 5
    client.close()
    conn.close()


def test_an_answer_larger_than_the_socket_buffers_is_sent_whole_and_in_order():
    # sendall's first send takes what fits; the rest follows on the same send clock.
    import threading

    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=60)
    server_side, client = socket.socketpair()
    conn = GuardedSocket(server_side, guard)
    payload = bytes(range(256)) * 32_768  # 8 MB
    received = bytearray()

    def read() -> None:
        while len(received) < len(payload):
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    conn.sendall(payload)
    reader.join(timeout=60)
    assert bytes(received) == payload and conn.phase == "send"


def test_a_client_that_resets_with_its_answer_unread_is_not_waited_for():
    """The kernel keeps counting a reset connection's unsent bytes: the wait for them to be
    taken must end with the connection, not at the send clock (it held the greenlet, and a
    stopping worker, for the whole CCPROXY_SEND_TIMEOUT)."""
    import struct as _struct

    guard = ConnectionGuard(header_timeout=10, keepalive_timeout=75, max_connections=10, send_timeout=60)
    conn, client, server_side = unread_answer(guard)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
    client.close()  # a reset
    wait_for(lambda: server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 1, seconds=30,
             what="the reset seen by the server's socket")
    with conn.reading_request():  # not read: the connection is over
        assert conn.phase == "" and conn.recv(10) == b""
    assert guard.closed["send_timeout"] == 0  # it did not wait out its 60 s send clock
    server_side.close()


def open_half_requests(port: int, count: int) -> list[socket.socket]:
    """Connections that send part of a request line and never finish it (slowloris)."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        held.append(s)
    wait_for(lambda: _all_connected(held), seconds=60, what="every connection established")
    for s in held:
        try:
            s.send(b"GET /v1/amplitude/properties?user_id=")
        except OSError:
            pass
    return held


def _all_connected(held: list[socket.socket]) -> bool:
    return all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in held)


def closed_by_server(held: list[socket.socket]) -> int:
    closed = 0
    for s in held:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def test_thousands_of_half_open_connections_do_not_stop_answers(guarded_server):
    server = guarded_server(max_connections=200)
    port = int(server.base.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {KEY}"}
    cached = f"{server.base}/v1/amplitude/properties?user_id=testUser"
    assert requests.get(cached, headers=auth, timeout=30).status_code == 200  # warm one worker
    held = open_half_requests(port, 3000)
    try:
        # Each worker holds at most 200: the rest were closed to make room for new clients.
        wait_for(lambda: closed_by_server(held) >= 3000 - 2 * 200 - 50, seconds=120,
                 what="the excess connections shed", poll=0.5)
        for _ in range(5):
            assert requests.get(f"{server.base}/healthz", timeout=30).status_code == 200
            answer = requests.get(cached, headers=auth, timeout=30)
            assert answer.status_code == 200 and answer.json()["found"] is True
    finally:
        for s in held:
            s.close()


def test_a_request_that_never_finishes_its_headers_is_closed(guarded_server):
    server = guarded_server(header_timeout=1, keepalive_timeout=30)
    port = int(server.base.rsplit(":", 1)[1])
    dribbler = socket.create_connection(("127.0.0.1", port), timeout=60)
    kept = requests.Session()
    assert kept.get(f"{server.base}/healthz", timeout=30).status_code == 200
    started = time.monotonic()
    try:
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                dribbler.send(bytes([byte]))
            except OSError:
                closed = True
                break
            dribbler.settimeout(0.3)
            try:
                if dribbler.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed, "a dribbling client kept its connection"
        # Closed by the header clock, long before the 30 s keep-alive one (loose bound).
        assert time.monotonic() - started < 25
        # An idle keep-alive connection is not cut by the header clock: it is reused.
        assert kept.get(f"{server.base}/healthz", timeout=30).status_code == 200
    finally:
        dribbler.close()


def test_a_body_over_the_limit_is_a_json_413(guarded_server):
    server = guarded_server(max_body=1000)
    r = requests.post(f"{server.base}/v1/mediarithmics/activities", data=b"{" + b" " * 5000 + b"}",
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 413 and r.headers["Connection"] == "close"  # the body is never read
    assert r.json() == {"ok": False, "error": {
        "code": "body_too_large", "message": "the request body is larger than 1000 bytes (CCPROXY_MAX_BODY)"}}
    # Without a length (chunked), the worker reads no more than the limit and one byte.
    chunked = requests.post(f"{server.base}/v1/mediarithmics/activities",
                            data=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]),
                            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                            timeout=30)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"


def test_sigterm_closes_idle_keepalive_connections_so_the_stop_is_prompt(guarded_server):
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port), timeout=60)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"ok":true}'):
        answer += idle.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    server.proc.send_signal(15)  # SIGTERM: the connection above is idle, kept alive
    # Closed at once (a loose 20 s bound), not after the 35 s graceful period or keep-alive.
    idle.settimeout(20)
    try:
        rest = idle.recv(4096)
    except ConnectionResetError:
        rest = b""
    assert rest == b""  # closed by the server, not left until keep-alive or the graceful end
    assert server.proc.wait(60) == 0
    idle.close()


AUTH_LINE = f"Authorization: Bearer {KEY}\r\n".encode()
ACTIVITY = b'{"$type": "TOUCH", "$ts": 1735689600000, "$user_identifiers": [{"$type": "USER_EMAIL", "$hash": "slow"}]}'


def slow_body(port: int) -> socket.socket:
    """A write whose headers arrive whole and whose body stops after a few bytes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/mediarithmics/activities HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE
              + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ACTIVITY) + ACTIVITY[:5])
    return s


def unread_answers(port: int) -> socket.socket:
    """A client that asks for megabytes of answers (pipelined) and reads none of them."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n" * 1)
    s.sendall((b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n") * 150)
    return s


def metrics_text(base: str) -> str:
    return requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text


@pytest.mark.parametrize("attack", [slow_body, unread_answers])
def test_connections_pinned_by_a_slow_body_or_an_unread_answer_do_not_stop_answers(guarded_server, attack):
    # Clocks far longer than the test: only shedding can make room for the normal client.
    server = guarded_server(max_connections=4, header_timeout=120, body_timeout=120, send_timeout=120)
    port = int(server.base.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {KEY}"}
    cached = f"{server.base}/v1/amplitude/properties?user_id=testUser"
    assert requests.get(cached, headers=auth, timeout=30).status_code == 200
    # Three times what both workers hold; the kernel hands them out in order, all before
    # the normal client below, so without shedding they fill every slot.
    held = [attack(port) for _ in range(3 * 2 * 4)]
    try:
        answer = requests.get(cached, headers=auth, timeout=30)
        assert answer.status_code == 200 and answer.json()["found"] is True
        assert requests.get(f"{server.base}/healthz", timeout=30).status_code == 200
        reason = "shed_body" if attack is slow_body else "shed_send"
        wait_for(lambda: sample(metrics_text(server.base), "ccproxy_connections_closed_total", reason=reason) >= 1,
                 seconds=60, what=f"{reason} counted")
    finally:
        for s in held:
            s.close()


def read_answer(s: socket.socket) -> bytes:
    answer = b""
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        answer += data
    return answer


def test_a_slow_body_is_answered_408_and_an_unread_answer_closed_at_their_deadlines(guarded_server):
    server = guarded_server(header_timeout=120, body_timeout=2, send_timeout=2)
    port = int(server.base.rsplit(":", 1)[1])
    # A body sent a byte every 0.2 s would take about 20 s: its 2 s clock ends it first.
    trickler = slow_body(port)
    answer = b""
    for byte in ACTIVITY[5:]:
        try:
            trickler.send(bytes([byte]))
        except OSError:
            break
        trickler.settimeout(0.2)
        try:
            answer = read_answer(trickler)
            break
        except TimeoutError:
            pass
    trickler.settimeout(60)
    answer += read_answer(trickler)  # then the server closes the connection
    trickler.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert json.loads(body) == {"ok": False, "error": {
        "code": "body_timeout", "message": "the request body did not arrive within 2 s (CCPROXY_BODY_TIMEOUT)"}}

    reader = unread_answers(port)
    try:
        wait_for(lambda: sample(metrics_text(server.base), "ccproxy_connections_closed_total",
                                reason="send_timeout") >= 1, seconds=60, what="the unread answer closed")
        # Closed, not left to hold the worker; and of its 151 pipelined requests only the
        # first was answered: the next waits until the client takes the answer before it.
        reader.settimeout(60)
        assert read_answer(reader).count(b"HTTP/1.1 200 ") == 1
    finally:
        reader.close()
    text = metrics_text(server.base)
    assert sample(text, "ccproxy_connections_closed_total", reason="body_timeout") == 1

    # Bodies a normal client sends are read whole, whatever their framing.
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server.base}/v1/mediarithmics/activities"
    assert requests.post(url, data=ACTIVITY, headers=auth, timeout=30).status_code == 202
    assert requests.post(url, data=iter([ACTIVITY[:20], ACTIVITY[20:]]), headers=auth, timeout=30).status_code == 202
    assert requests.post(url, data=ACTIVITY, headers={**auth, "Expect": "100-continue"},
                         timeout=30).status_code == 202


def test_gunicorn_sends_file_answers_through_the_guarded_socket():
    """The kernel's sendfile would bypass the send clock and the unread-answer count."""
    from gunicorn.config import Config

    from proxy.serving import gunicorn_options

    cfg = Config()
    for name, value in gunicorn_options("127.0.0.1", 0, 2).items():
        if name in cfg.settings:
            cfg.set(name, value)
    assert cfg.sendfile is False
