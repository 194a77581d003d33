"""The serve worker's fast lane (proxy/fast_lane.py): which requests it answers itself, the
exact bytes it hands to gunicorn for everything else, and a two-worker `ccproxy serve`
answering both kinds, in order, on one connection."""

from __future__ import annotations

import io
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import wait_for
from test_connections import KEY, metrics_text, read_answer
from test_metrics import sample

from proxy.connections import (
    HEADER_TRICKLE,
    MAX_HANDED_IN_A_ROW,
    MAX_HEAD_READS,
    ConnectionGuard,
    GuardedSocket,
)
from proxy.fast_lane import INCOMPLETE, NOT_DATA_ENDPOINT, NOT_PLAIN_GET, FastLane, plain_get

LIMITS = (4094, 100, 8190)  # gunicorn's defaults: request line, header count, header line
BRAZE = (b"GET /v1/amplitude/recommendations?rec_id=r1&user_id=u%401 HTTP/1.1\r\nHost: proxy.example\r\n"
         b"User-Agent: Braze Sender 1.0\r\nAuthorization: Bearer k\r\nX-Request-Id: abc-1\r\n"
         b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive")


def test_a_braze_call_is_a_plain_get():
    request = plain_get(BRAZE, *LIMITS)
    assert request is not None
    assert (request.path, request.query, request.close) == (
        "/v1/amplitude/recommendations", "rec_id=r1&user_id=u%401", False)
    assert request.environ_headers == {
        "HTTP_HOST": "proxy.example", "HTTP_USER_AGENT": "Braze Sender 1.0", "HTTP_AUTHORIZATION": "Bearer k",
        "HTTP_X_REQUEST_ID": "abc-1", "HTTP_ACCEPT_ENCODING": "gzip, deflate", "HTTP_CONNECTION": "keep-alive"}
    closing = plain_get(b"GET /v1/x HTTP/1.1\r\nConnection: Close\r\nEmpty:", *LIMITS)
    assert closing is not None and closing.close and closing.environ_headers["HTTP_EMPTY"] == ""


@pytest.mark.parametrize("head", [
    b"POST /v1/x HTTP/1.1\r\nHost: a",                       # not a GET
    b"HEAD /v1/x HTTP/1.1\r\nHost: a",
    b"GET /v1/x HTTP/1.0\r\nHost: a",                        # HTTP/1.0: other keep-alive rules
    b"GET /v1/x HTTP/1.1\r\nContent-Length: 0",              # framing headers: gunicorn's
    b"GET /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"GET /v1/x HTTP/1.1\r\nExpect: 100-continue",
    b"GET /v1/x HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings",
    b"GET /v1/x HTTP/1.1\r\nConnection: keep-alive, close",
    b"GET /v1/x HTTP/1.1\r\nX_Api_Key: k",                   # underscore: gunicorn drops or refuses it
    b"GET /v1/x HTTP/1.1\r\nX-Request-Id: a\r\nx-request-id: b",  # repeated
    b"GET /v1/x HTTP/1.1\r\nX-A: a\r\n b",                   # obs-fold
    b"GET /v1/x HTTP/1.1\r\nX-A: caf\xc3\xa9",               # obs-text
    b"GET /v1/x HTTP/1.1\r\nX-A: a\x00b",                    # a control byte
    b"GET /v1/x HTTP/1.1\r\nX-A: a\nX-B: b",                 # a bare LF
    b"GET /v1/x HTTP/1.1\r\nX-A : a",                        # space before the colon
    b"GET /v1/%78 HTTP/1.1",                                 # an escaped path
    b"GET /v1/x#frag HTTP/1.1",
    b"GET /v1/x?a=<b> HTTP/1.1",
    b"GET http://a/v1/x HTTP/1.1",                           # absolute form
    b"GET  /v1/x HTTP/1.1",
    b"\r\nGET /v1/x HTTP/1.1",
    b"PRI * HTTP/2.0",
    b"GET /v1/x?" + b"a" * 4100 + b" HTTP/1.1",              # over gunicorn's request line
    b"GET /v1/x HTTP/1.1" + b"\r\nX-A: a" * 101,             # over its header count
    b"GET /v1/x HTTP/1.1\r\nX-A: " + b"a" * 8200,            # over its header line
    b"GET /v1/x HTTP/1.1\r\nX-A: " + b"a" * 8184,            # 8,189 bytes + CRLF: over it too
])
def test_anything_else_is_left_to_gunicorn(head):
    assert plain_get(head, *LIMITS) is None


def test_a_header_of_spaces_ending_in_a_stray_byte_is_refused_in_linear_time():
    # Whitespace then a byte outside the grammar made the header pattern backtrack
    # quadratically (8 KB: 160 ms of a worker per request). At 4 MB quadratic is hours and
    # linear milliseconds: the child either finishes or the generous timeout says it hung.
    code = ("from proxy.fast_lane import _HEADER, plain_get\n"
            "for end in (b'\\x00', b'\\r', b'\\xe9'):\n"
            "    for ws in (b' ', b'\\t'):\n"
            "        assert _HEADER.match(b'X:' + ws * 4_000_000 + end) is None\n"
            "        assert _HEADER.match(b'X: a' + ws * 4_000_000 + end) is None\n"
            "assert plain_get(b'GET /v1/d HTTP/1.1\\r\\nX:' + b' ' * 8185 + b'\\x00', 4094, 100, 8190) is None\n"
            "assert _HEADER.match(b'X:' + b' ' * 4_000_000).group(2) is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_limits_count_as_gunicorn_counts_them():
    assert plain_get(b"GET /v1/x HTTP/1.1\r\nX-A: " + b"a" * 8183, *LIMITS) is not None  # 8,188 + CRLF
    assert plain_get(b"GET /v1/x HTTP/1.1" + b"\r\nX-A: a" * 100, *LIMITS) is None       # repeated anyway
    assert plain_get(b"GET /v1/x HTTP/1.1" + b"".join(b"\r\nX-%d: a" % i for i in range(100)), *LIMITS)


SCHEME = {b"x-forwarded-proto": b"https", b"x-forwarded-ssl": b"on"}


def test_scheme_headers_count_only_from_a_trusted_peer_and_must_agree():
    said = plain_get(b"GET /v1/x HTTP/1.1\r\nX-Forwarded-Proto: https", *LIMITS, SCHEME)
    assert said is not None and said.scheme == "https"
    assert plain_get(b"GET /v1/x HTTP/1.1\r\nX-Forwarded-Ssl: off", *LIMITS, SCHEME).scheme == "http"
    agreeing = plain_get(b"GET /v1/x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: on", *LIMITS, SCHEME)
    assert agreeing is not None and agreeing.scheme == "https"
    # Conflicting: gunicorn refuses the request (400), so it is gunicorn's.
    assert plain_get(b"GET /v1/x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off",
                     *LIMITS, SCHEME) is None
    untrusted = plain_get(b"GET /v1/x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off", *LIMITS)
    assert untrusted is not None and untrusted.scheme == "http"
    assert untrusted.environ_headers["HTTP_X_FORWARDED_PROTO"] == "https"
    cfg = SimpleNamespace(limit_request_line=4094, limit_request_fields=100, limit_request_field_size=8190,
                          forwarded_allow_ips=["127.0.0.1", "10.0.0.0/8"],
                          secure_scheme_headers={"X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"})
    lane = FastLane(Sent(), ("/v1/d",), cfg, lambda: True, lambda: None, "g")
    assert lane.scheme_headers_of(("10.1.2.3", 5)) == SCHEME and lane.scheme_headers_of(("127.0.0.1", 5)) == SCHEME
    assert lane.scheme_headers_of(("192.168.1.1", 5)) == {} and lane.scheme_headers_of(("::1", 5)) == {}
    cfg.forwarded_allow_ips = ["*"]
    assert FastLane(Sent(), (), cfg, lambda: True, lambda: None, "g").scheme_headers_of(("8.8.8.8", 5)) == SCHEME


def test_the_environ_has_gunicorns_keys():
    app = Sent()
    lane, conn, client, _ = lane_pair(app)
    lane.base_environ = {"wsgi.errors": "errors", "SERVER_SOFTWARE": "gunicorn/x"}
    client.sendall(b"GET /v1/d HTTP/1.1\r\nContent-Type: text/plain\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    assert lane.serve(conn, ("10.0.0.9", 5000), ("127.0.0.1", 8000)) is None
    environ = app.environs[0]
    assert environ["CONTENT_TYPE"] == "text/plain" and "HTTP_CONTENT_TYPE" not in environ
    assert environ["wsgi.input"].read() == b"" and environ["REMOTE_PORT"] == "5000"
    assert (environ["wsgi.errors"], environ["SERVER_SOFTWARE"], environ["wsgi.url_scheme"]) == (
        "errors", "gunicorn/x", "http")


def test_a_head_begun_with_the_last_one_is_on_the_header_clock():
    app = Sent()
    lane, conn, client, guard = lane_pair(app, header_timeout=0.3, keepalive_timeout=60)
    client.sendall(b"GET /v1/d HTTP/1.1\r\n\r\nGET /v1")  # then nothing more
    assert lane.serve(conn, ("a", 1), ("b", 2)) == b"GET /v1" and len(app.environs) == 1
    assert guard.closed == {"header_timeout": 1} and guard.handed_over == {INCOMPLETE: 1}


class Sent:
    def __init__(self) -> None:
        self.environs: list[dict] = []

    def __call__(self, environ, start_response):
        self.environs.append(environ)
        body = json.dumps({"path": environ["PATH_INFO"], "query": environ["QUERY_STRING"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def lane_pair(app, data_paths=("/v1/d",), count=lambda: True, socket_class=None, header_timeout=10,
              keepalive_timeout=75):
    guard = ConnectionGuard(header_timeout=header_timeout, keepalive_timeout=keepalive_timeout, max_connections=10)
    server_side, client = socket.socketpair()
    conn = (socket_class or GuardedSocket)(server_side, guard)
    cfg = SimpleNamespace(limit_request_line=4094, limit_request_fields=100, limit_request_field_size=8190)
    lane = FastLane(app, data_paths, cfg, count, lambda: None, "gunicorn")
    return lane, conn, client, guard


def answers(data: bytes) -> list[tuple[bytes, dict, bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        size = int(headers[b"Content-Length"])
        out.append((lines[0], headers, rest[:size]))
        data = rest[size:]
    return out


def test_the_lane_answers_plain_gets_and_hands_over_the_rest_byte_for_byte():
    app = Sent()
    lane, conn, client, guard = lane_pair(app)
    rest = b"POST /v1/d HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + b"GET /v1/d?b=2 HTTP/1.1\r\n\r\n"
    client.sendall(b"GET /v1/d?a=1 HTTP/1.1\r\nHost: h\r\n\r\n" + b"GET /v1/d HTTP/1.1\r\n\r\n" + rest)
    assert lane.serve(conn, ("10.0.0.9", 5000), ("127.0.0.1", 8000)) == rest
    assert conn.requests == 2 and guard.handed_over == {NOT_PLAIN_GET: 1}
    assert [(e["PATH_INFO"], e["QUERY_STRING"], e["REMOTE_ADDR"], e["SERVER_PORT"]) for e in app.environs] == [
        ("/v1/d", "a=1", "10.0.0.9", "8000"), ("/v1/d", "", "10.0.0.9", "8000")]
    client.settimeout(10)
    got = answers(client.recv(65536))
    assert [(status, json.loads(body)["query"]) for status, _, body in got] == [
        (b"HTTP/1.1 200 OK", "a=1"), (b"HTTP/1.1 200 OK", "")]
    assert got[0][1][b"Server"] == b"gunicorn" and got[0][1][b"Connection"] == b"keep-alive"
    assert b"GMT" in got[0][1][b"Date"]
    # gunicorn's parser then reads the handed-over bytes first, on the clock they came on
    # (its read of this request does not start a new one).
    conn.hand_over(rest)
    phase, deadline = conn.phase, conn.deadline
    with conn.reading_request():
        assert conn.recv(8) == b"POST /v1" and (conn.phase, conn.deadline) == (phase, deadline)
    assert conn.phase == "body" and not conn.resumed and conn.requests == 3


def test_other_routes_and_partial_heads_go_to_gunicorn_and_a_hang_up_ends_the_lane():
    lane, conn, client, guard = lane_pair(Sent())
    client.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert lane.serve(conn, ("a", 1), ("b", 2)) == b"GET /healthz HTTP/1.1\r\n\r\n"
    assert guard.handed_over == {NOT_DATA_ENDPOINT: 1}
    lane, conn, client, guard = lane_pair(Sent())
    client.sendall(b"GET /v1/d HTT")
    client.shutdown(socket.SHUT_WR)
    assert lane.serve(conn, ("a", 1), ("b", 2)) == b"GET /v1/d HTT"  # gunicorn says what is wrong
    lane, conn, client, guard = lane_pair(Sent())
    client.close()
    assert lane.serve(conn, ("a", 1), ("b", 2)) is None and not guard.handed_over


def test_connection_close_and_a_stopping_worker_end_the_connection_after_the_answer():
    app = Sent()
    lane, conn, client, _ = lane_pair(app)
    client.sendall(b"GET /v1/d HTTP/1.1\r\nConnection: close\r\n\r\nGET /v1/d HTTP/1.1\r\n\r\n")
    assert lane.serve(conn, ("a", 1), ("b", 2)) is None and len(app.environs) == 1
    client.settimeout(10)
    assert answers(client.recv(65536))[0][1][b"Connection"] == b"close"
    app = Sent()
    lane, conn, client, _ = lane_pair(app, count=lambda: False)  # gunicorn's max_requests reached
    client.sendall(b"GET /v1/d HTTP/1.1\r\n\r\nGET /v1/d HTTP/1.1\r\n\r\n")
    assert lane.serve(conn, ("a", 1), ("b", 2)) is None and len(app.environs) == 1


def test_a_head_begun_in_bytes_handed_back_is_on_the_header_clock():
    # Back from gunicorn with nothing in its read-ahead but a partial head still pending.
    lane, conn, _, guard = lane_pair(Sent(), header_timeout=0.3, keepalive_timeout=60)
    conn.requests, conn.pending = 1, b"GET /v1"
    assert lane.serve(conn, ("a", 1), ("b", 2)) == b"GET /v1"
    assert guard.closed == {"header_timeout": 1} and guard.handed_over == {INCOMPLETE: 1}


class OneByteAtATime(GuardedSocket):
    """A client trickling its head: every read returns a single byte."""

    __slots__ = ()

    def recv(self, size: int, *flags: int) -> bytes:
        return super().recv(1, *flags)


def test_a_head_trickled_byte_by_byte_is_answered_or_handed_over_whole():
    app = Sent()
    lane, conn, client, guard = lane_pair(app, socket_class=OneByteAtATime)
    other = b"GET /v1/d HTTP/1.1\r\nX-A: a\r\nX_B: b\r\n\r\n"
    client.sendall(b"GET /v1/d?a=1 HTTP/1.1\r\nHost: h\r\n\r\n" + other)
    assert lane.serve(conn, ("a", 1), ("b", 2)) == other  # every byte, in order, one read each
    assert [e["QUERY_STRING"] for e in app.environs] == ["a=1"] and guard.handed_over == {NOT_PLAIN_GET: 1}
    assert not guard.closed


def test_a_head_in_more_pieces_than_any_client_sends_is_closed_like_a_slow_one():
    # gunicorn's parser copies its buffer on every read: a head trickled a byte per read cost
    # seconds of CPU. Past MAX_HEAD_READS reads the head ends as if its clock ran out.
    lane, conn, client, guard = lane_pair(Sent(), socket_class=OneByteAtATime)
    client.sendall(b"GET /v1/d HTTP/1.1\r\nX-A: " + b"a" * 8000)
    read = lane.serve(conn, ("a", 1), ("b", 2))
    assert read is not None and len(read) == MAX_HEAD_READS
    assert guard.closed == {HEADER_TRICKLE: 1} and guard.handed_over == {INCOMPLETE: 1}
    conn.hand_over(read)
    whole = GuardedSocket.recv  # gunicorn's reads, not the trickle's
    assert whole(conn, 65536) == read and whole(conn, 65536) == b""  # then the end, as after a clock


@pytest.mark.parametrize("header", [
    ("X-Evil", "a\r\nSet-Cookie: b"), ("X-Evil", "a\nb"), ("X-Evil", "a\rb"), ("X-Evil", "a\x00b"),
    ("Bad Name", "a"), ("", "a"), ("X:Y", "a"),
])
def test_an_answer_header_gunicorn_would_refuse_is_never_sent(header):
    def app(environ, start_response):
        start_response("200 OK", [("X-Ok", "1"), header])
        return [b"{}"]

    lane, conn, client, _ = lane_pair(app)
    client.sendall(b"GET /v1/d HTTP/1.1\r\n\r\n")
    with pytest.raises(ValueError):
        lane.serve(conn, ("a", 1), ("b", 2))
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(10)


def test_hop_by_hop_answer_headers_are_dropped_and_values_trimmed_as_gunicorn_does():
    def app(environ, start_response):
        start_response("200 OK", [("Connection", "upgrade"), ("Server", "evil"), ("Date", "x"),
                                  ("Transfer-Encoding", "chunked"), ("X-Ok", " 1\t"), ("Content-Length", "2")])
        return [b"{}"]

    lane, conn, client, _ = lane_pair(app)
    client.sendall(b"GET /v1/d HTTP/1.1\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    assert lane.serve(conn, ("a", 1), ("b", 2)) is None
    client.settimeout(10)
    head = client.recv(65536).split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head == [b"HTTP/1.1 200 OK", b"Server: gunicorn", head[2], b"Connection: keep-alive",
                    b"X-Ok: 1", b"Content-Length: 2"]


# Live: a two-worker `ccproxy serve`, raw sockets.

AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
CACHED = b"GET /v1/amplitude/properties?user_id=testUser HTTP/1.1\r\nHost: x\r\n" + AUTH


def exchange(port: int, payload: bytes, pieces: int = 1) -> list[tuple[bytes, dict, bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        step = -(-len(payload) // pieces)
        for i in range(0, len(payload), step):
            s.sendall(payload[i:i + step])
            if pieces > 1:
                time.sleep(0.01)  # separate segments, whatever the machine's speed
        s.shutdown(socket.SHUT_WR)
        return answers(read_answer(s))


def test_serve_answers_plain_gets_and_everything_else_in_order_on_one_connection(guarded_server):
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    got = exchange(port, CACHED + b"X-Request-Id: first\r\n\r\n"
                   + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                   + CACHED + b"X-Request-Id: third\r\n\r\n"
                   + CACHED + b"X_Forwarded_Thing: 1\r\n\r\n"
                   + CACHED + b"Content-Length: 2\r\n\r\n{}")
    assert [status for status, _, _ in got] == [b"HTTP/1.1 200 OK"] * 5
    assert [headers.get(b"X-Request-Id") for _, headers, _ in got][:3:2] == [b"first", b"third"]
    bodies = [json.loads(body) for _, _, body in got]
    assert bodies[0]["found"] is True and bodies[0] == bodies[2] == bodies[3] == bodies[4]
    assert "found" not in bodies[1]
    text = metrics_text(server.base)
    assert sample(text, "ccproxy_connections_handed_over_total", reason="not_data_endpoint") >= 1


def test_after_gunicorns_answer_the_connection_comes_back_to_the_lane(guarded_server):
    # A write or a preview on a connection (a load balancer's pooled one, say) must not cost
    # every later data call on it the lane: each request outside the lane is one hand-over,
    # and the bytes pipelined behind it (a body gunicorn reads in 8 KB pieces, then more
    # heads) are answered in order.
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    body = b"{" + b" " * 19_998 + b"}"
    got = exchange(port, CACHED + b"X-Request-Id: a\r\n\r\n"
                   + b"POST /v1/amplitude/properties HTTP/1.1\r\nHost: x\r\n" + AUTH
                   + b"Content-Type: application/json\r\nContent-Length: 20000\r\n\r\n" + body
                   + CACHED + b"X-Request-Id: b\r\n\r\n"
                   + CACHED + b"X-Request-Id: c\r\nX_Not_Plain: 1\r\n\r\n"
                   + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                   + CACHED + b"X-Request-Id: d\r\n\r\n"
                   + CACHED + b"X-Request-Id: e\r\nX_Not_Plain: 1\r\n\r\n"
                   + CACHED + b"X-Request-Id: f\r\n\r\n")
    assert [status.split(b" ")[1] for status, _, _ in got] == [b"200", b"405"] + [b"200"] * 6
    ids = [headers.get(b"X-Request-Id") for _, headers, _ in got]
    assert ids[:1] + ids[2:4] + ids[5:] == [b"a", b"b", b"c", b"d", b"e", b"f"]
    assert all(json.loads(got[i][2])["found"] is True for i in (0, 2, 3, 5, 6, 7))
    # The POST and both underscore heads were each handed over: the connection came back to
    # the lane after each answer (kept by gunicorn, only the POST would count). Scrapes of
    # /metrics are hand-overs of their own, but never not_plain_get.
    wait_for(lambda: sample(metrics_text(server.base), "ccproxy_connections_handed_over_total",
                            reason="not_plain_get") == 3, seconds=60, what="three not_plain_get hand-overs")


def test_a_connection_whose_requests_all_go_to_gunicorn_stays_with_gunicorn(guarded_server):
    # After MAX_HANDED_IN_A_ROW hand-overs in a row the lane stops scanning that connection's
    # heads (a load balancer adding an underscore header to every call, say).
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    got = exchange(port, (CACHED + b"X_Added: 1\r\n\r\n") * (MAX_HANDED_IN_A_ROW + 4) + CACHED + b"\r\n")
    assert [status for status, _, _ in got] == [b"HTTP/1.1 200 OK"] * (MAX_HANDED_IN_A_ROW + 5)
    wait_for(lambda: sample(metrics_text(server.base), "ccproxy_connections_handed_over_total",
                            reason="not_plain_get") == MAX_HANDED_IN_A_ROW, seconds=60,
             what=f"{MAX_HANDED_IN_A_ROW} hand-overs, then gunicorn keeps the connection")


def test_serve_reads_a_head_that_comes_in_pieces_and_counts_a_data_call_outside_the_lane(guarded_server):
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    got = exchange(port, CACHED + b"\r\n", pieces=12)
    assert len(got) == 1 and got[0][0] == b"HTTP/1.1 200 OK" and json.loads(got[0][2])["found"] is True
    got = exchange(port, CACHED + b"X_Custom: 1\r\n\r\n")
    assert got[0][0] == b"HTTP/1.1 200 OK" and json.loads(got[0][2])["found"] is True
    wait_for(lambda: sample(metrics_text(server.base), "ccproxy_connections_handed_over_total",
                            reason="not_plain_get") >= 1, seconds=60, what="the hand-over counted")


def test_protocol_errors_after_a_fast_answer_are_still_gunicorns_json(guarded_server):
    server = guarded_server()
    port = int(server.base.rsplit(":", 1)[1])
    long_url = b"GET /v1/amplitude/properties?user_id=" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    got = exchange(port, CACHED + b"\r\n" + long_url)
    assert [status for status, _, _ in got] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 414 URI Too Long"]
    assert json.loads(got[1][2])["error"]["code"] == "uri_too_long" and b"aaaa" not in got[1][2]
    got = exchange(port, CACHED + b"\r\n" + b"GET /v1/amplitude/properties HTTP/1.1\r\nBad Header\r\n\r\n")
    assert got[1][0].startswith(b"HTTP/1.1 400") and json.loads(got[1][2])["error"]["code"] == "bad_request"


def test_with_the_lane_off_gunicorn_parses_every_request(guarded_server):
    server = guarded_server(fast_lane="false")
    port = int(server.base.rsplit(":", 1)[1])
    got = exchange(port, CACHED + b"\r\n" + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + CACHED + b"\r\n")
    assert [status for status, _, _ in got] == [b"HTTP/1.1 200 OK"] * 3
    assert json.loads(got[2][2])["found"] is True
    text = metrics_text(server.base)
    assert sample(text, "ccproxy_requests_total") >= 3
    assert sample(text, "ccproxy_connections_handed_over_total") == 0


# Differential: every head the lane accepts, gunicorn's own parser reads to the same request.

FUZZ_BYTES = [b"a", b"Z", b"-", b"_", b" ", b"\t", b":", b"\r", b"\n", b"\x00", b"\x7f", b"\xe9", b"/", b"?",
              b"%", b"#", b"~", b"!", b"0", b",", b";", b"=", b'"', b"\\", b".", b"*", b"@"]
FUZZ_NAMES = [b"Host", b"Connection", b"Content-Length", b"Transfer-Encoding", b"Expect", b"X-Forwarded-Proto",
              b"X-Forwarded-Ssl", b"X-Forwarded-Protocol", b"Content-Type", b"Upgrade", b"TE", b"Authorization",
              b"X-Api-Key", b"Keep-Alive", b"Trailer", b"Script-Name", b"Forwarded", b"X-Forwarded-For"]
FUZZ_VALUES = [b"close", b"keep-alive", b"Close", b"https", b"http", b"on", b"off", b"ssl", b"0", b"chunked",
               b"100-continue", b"a b", b" x ", b"", b"Bearer k", b"application/json"]


def fuzz_head(rng) -> bytes:
    def junk(n: int) -> bytes:
        return b"".join(rng.choice(FUZZ_BYTES) for _ in range(n))

    path = rng.choice([b"/v1/d", b"/v1/d/", b"//v1/d", b"/v1/./d", b"/" + junk(3), b"/v1/%64", b"/v1/d%2F",
                       b"/v1/d%" + junk(2)])
    query = rng.choice([b"", b"?a=1", b"?" + junk(4), b"?a=%41&b", b"?x?y/z"])
    version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.10", b"http/1.1"])
    lines = [rng.choice([b"GET"] * 8 + [b"get", b"HEAD"]) + b" " + path + query + b" " + version]
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(FUZZ_NAMES + [junk(rng.randint(1, 4))])
        value = rng.choice(FUZZ_VALUES + [junk(rng.randint(0, 5))])
        lines.append(name + rng.choice([b": ", b":", b":\t", b" : "]) + value + rng.choice([b"", b"", b" ", b"\t"]))
    return b"\r\n".join(lines)


class BytesSocket:
    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self.data.read(size)

    def sendall(self, data: bytes) -> None:
        pass


# Objects made per request (or per environ) on either side: compared by presence only.
PER_REQUEST = {"wsgi.input", "wsgi.errors", "gunicorn.socket", "wsgi.early_hints"}


def test_every_head_the_lane_accepts_gunicorn_parses_to_the_same_request():
    from gunicorn.config import Config
    from gunicorn.http import wsgi
    from gunicorn.http.parser import RequestParser

    cfg = Config()  # gunicorn's defaults: 127.0.0.1 and ::1 may set the scheme headers
    app = Sent()
    lane = FastLane(app, ("/v1/d",), cfg, lambda: True, lambda: None, "g", wsgi.base_environ(cfg))
    rng = random.Random(15)
    compared, differences = Counter(), []
    for _ in range(30_000):
        head = fuzz_head(rng)
        for peer in (("10.0.0.1", 5), ("127.0.0.1", 5)):
            mine = plain_get(head, cfg.limit_request_line, cfg.limit_request_fields, cfg.limit_request_field_size,
                             lane.scheme_headers_of(peer))
            if mine is None:
                continue
            compared[peer[0]] += 1
            parser = RequestParser(cfg, BytesSocket(head + b"\r\n\r\nGET /next HTTP/1.1\r\n\r\n"), peer)
            try:
                request = next(parser)
                body = request.body.read()
                after = None if request.should_close() else next(parser).path
                _, environ = wsgi.create(request, BytesSocket(b""), peer, ("127.0.0.1", 8000), cfg)
                environ["wsgi.multithread"] = True  # as gunicorn's async worker sets it
            except Exception as refused:  # gunicorn refuses what the lane would answer
                differences.append((head, peer[0], repr(refused)))
                continue
            lane.answer(BytesSocket(b""), mine, peer, ("127.0.0.1", 8000), mine.close)
            given = app.environs.pop()
            if (body, after, request.should_close()) != (b"", None if mine.close else "/next", mine.close):
                differences.append((head, peer[0], "framed differently"))
            elif {k: v for k, v in given.items() if k not in PER_REQUEST} != {
                    k: v for k, v in environ.items() if k not in PER_REQUEST} or PER_REQUEST - {
                    "gunicorn.socket", "wsgi.early_hints"} - given.keys():
                differences.append((head, peer[0], "a different environ"))
    assert min(compared.values()) > 1_500  # the generator reaches the lane's subset
    assert differences == []
