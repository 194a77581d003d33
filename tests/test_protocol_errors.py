"""Requests gunicorn answers itself, before the app (too long, not HTTP): the proxy's JSON
error shape all the same, from a real `ccproxy serve` over loopback."""

from __future__ import annotations

import json
import socket

import pytest
import requests

KEY = "protocol-key"


@pytest.fixture
def server(sandboxes, servers):
    env = {"CCPROXY_" + k.upper(): str(v) for k, v in sandboxes.proxy_settings().items()}
    env.update({"CCPROXY_API_KEYS": KEY, "CCPROXY_LOG_LEVEL": "WARNING"})
    return servers.start(["serve", "--workers", "1"], env, clean_env=True)


def raw(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_10_kb_url_is_a_json_414(server):
    r = requests.get(server.base + "/v1/amplitude/recommendations?user_id=" + "u" * 10_000,
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 414
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["ok"] is False and r.json()["error"]["code"] == "uri_too_long"
    assert "u" * 100 not in r.text  # the request is not echoed


def test_a_malformed_request_line_is_a_json_400_without_an_echo(server):
    answer = raw(server.base, b"GET /healthz?api_key=secret-in-line HTTP/1.1 extra\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/json" in head
    parsed = json.loads(body)
    assert parsed["ok"] is False and parsed["error"]["code"] == "bad_request"
    assert b"secret-in-line" not in answer
    # The server goes on answering.
    assert requests.get(server.base + "/healthz", timeout=10).status_code == 200


def test_a_request_gunicorn_refuses_is_logged_without_its_text(server):
    """gunicorn quotes the offending header or line in its log: a credential or an id."""
    answer = raw(server.base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization Bearer SEKRETKEY123456789\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = raw(server.base, b"GET /v1/amplitude/properties?user_id=customer-4711 HTTP/1.1 x\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert requests.get(server.base + "/healthz", timeout=10).status_code == 200
    log = server.output()
    assert "Invalid request from ip=127.0.0.1 (its text is not logged)" in log
    assert "SEKRETKEY123456789" not in log and "customer-4711" not in log
