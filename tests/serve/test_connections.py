"""Idle, half-sent and trickling connections are closed within the server's read deadlines, a connection
cap keeps them from locking real clients out, and an oversized request head is refused: real sockets."""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path
from typing import List
from urllib.parse import urlparse

import httpx
import pytest

from tests.serve.conftest import live

HEADER_S, BODY_S, KEEP_ALIVE_S, CAP = 1.0, 1.0, 0.5, 300
BODY = {"environment": "home", "context": {"user": "7"}, "candidates": {"ids": ["1", "2", "3"]}}


@pytest.fixture
def server(registry: Path):
    overrides = ["serve=home", f"server.header_timeout_s={HEADER_S}", f"server.body_timeout_s={BODY_S}",
                 f"server.keep_alive_s={KEEP_ALIVE_S}", f"server.max_connections={CAP}"]  # fmt: skip
    with live(registry, overrides) as s:
        yield s


def _open(url: str, n: int, send: bytes = b"") -> List[socket.socket]:
    u = urlparse(url)
    out = []
    for _ in range(n):
        s = socket.create_connection((u.hostname, u.port), timeout=5)
        if send:
            s.sendall(send)
        out.append(s)
    return out


def _closed_by_server(sock: socket.socket) -> bool:
    """EOF (or a reset) from the server; an answer before it (a refusal) is read past."""
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _wait_all_closed(socks: List[socket.socket], seconds: float, trickle: List[socket.socket] = ()) -> list:
    """Sockets the server has not closed after ``seconds`` (trickling a byte to ``trickle`` meanwhile)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    deadline, open_ = time.monotonic() + seconds, set(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            if _closed_by_server(key.fileobj):
                sel.unregister(key.fileobj)
                open_.discard(key.fileobj)
        for s in trickle:
            if s in open_:
                try:
                    s.send(b"X")  # bytes trickling in do not extend the deadline
                except OSError:
                    pass
    sel.close()
    return list(open_)


def test_idle_half_sent_and_trickling_connections_are_closed_and_real_requests_still_answer(server):
    head = b"POST /v1/rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    idle = _open(server.url, 150)
    half_head = _open(server.url, 100, head)
    half_body = _open(server.url, 100, head + b'content-length: 1000\r\n\r\n{"environment":')
    trickle = _open(server.url, 20, b"GET /healthz HTTP/1.1\r\n")
    socks = idle + half_head + half_body + trickle
    try:
        assert len(socks) > CAP  # past the cap: new clients must still get in
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(3):
                r = c.post("/v1/rank", json=BODY)
                assert r.status_code == 200, r.text
        left = _wait_all_closed(socks, 6 * (KEEP_ALIVE_S + HEADER_S + BODY_S), trickle)
        assert not left, f"{len(left)} of {len(socks)} connections still open"
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/healthz").status_code == 200
    finally:
        for s in socks:
            s.close()


def test_a_keep_alive_connection_is_closed_after_its_idle_time_and_answers_until_then(server):
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert b"200 OK" in s.recv(65536)
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # then nothing: half a head after an answer
        assert not _wait_all_closed([s], 6 * (KEEP_ALIVE_S + HEADER_S))


def test_an_oversized_request_head_is_refused_with_431(server):
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        try:
            for i in range(200):
                s.sendall(f"x-pad-{i}: {'a' * 1000}\r\n".encode())
        except OSError:
            pass  # the server may close while we still send
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 400"), answer[:80]
