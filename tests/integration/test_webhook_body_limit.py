"""The webhook reads no more than its limit: the plugin app served by a real uvicorn on loopback,
requests written byte by byte on a raw socket (chunked uploads of 300 MB, lying or huge
Content-Length), counting how much the server let the client send before answering.

The finding: one unsigned 300 MB request grew the API server by 231 MB (the body was read whole
before the signature was checked).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import threading
import time

import pytest

from gitops_ml import webhooks
from tests.helpers import free_port

pytestmark = pytest.mark.integration

SECRET = "hook-secret-limit"
ATTEMPT = 300 * 1024 * 1024
CHUNK = 64 * 1024
# Loopback socket buffers can hold a few MB that the server never read; far below the 300 MB tried.
SLACK = 24 * 1024 * 1024


@pytest.fixture
def webhook_url(tmp_path, monkeypatch):
    import uvicorn

    from gitops_ml.airflow.links import create_app

    config = tmp_path / "watch.yaml"
    config.write_text(json.dumps({"repositories": [{"name": "demo", "repo_url": str(tmp_path / "nowhere")}]}))
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    monkeypatch.setenv("GITOPS_ML_WEBHOOK_SECRET", SECRET)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(10)


def _send(port: int, headers: dict[str, str], body_bytes: int, chunked: bool) -> tuple[int, dict, int]:
    """Send headers then up to ``body_bytes`` of body until the server answers or closes;
    return (status, JSON answer, body bytes the server let us send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /webhooks/demo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + ("Transfer-Encoding: chunked\r\n" if chunked else "") + "\r\n").encode())
    sent = 0
    chunk = b"x" * CHUNK
    frame = (f"{CHUNK:x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
    sock.setblocking(False)
    try:
        while sent < body_bytes:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break  # the server answered (or closed) before the body was complete
            if not writable:
                raise AssertionError("server neither read nor answered for 10 s")
            try:
                sock.send(frame)
            except BlockingIOError:
                continue
            sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            break
        if not more:
            break
        data += more
    sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(payload[: _length(data)] or b"{}"), sent


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _signed_headers() -> dict[str, str]:
    # A signature header that looks right: the HMAC itself can only be checked on a complete body.
    return {
        "X-GitHub-Event": "push",
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), b"x", hashlib.sha256).hexdigest(),
    }


def test_unsigned_huge_request_is_refused_before_its_body_is_read(webhook_url):
    status, answer, sent = _send(webhook_url, {"X-GitHub-Event": "push"}, ATTEMPT, chunked=True)
    assert status == 401 and "X-Hub-Signature-256" in answer["error"]
    assert sent < SLACK, f"the server let the client send {sent} bytes"


def test_signed_chunked_upload_is_cut_at_the_limit(webhook_url):
    status, answer, sent = _send(webhook_url, _signed_headers(), ATTEMPT, chunked=True)
    assert status == 413, answer
    assert "5 MB" in answer["error"]
    assert webhooks.MAX_BODY_BYTES < sent < webhooks.MAX_BODY_BYTES + SLACK, sent


def test_declared_content_length_over_the_limit_is_refused_at_once(webhook_url):
    headers = {**_signed_headers(), "Content-Length": str(ATTEMPT)}
    started = time.monotonic()
    status, answer, sent = _send(webhook_url, headers, ATTEMPT, chunked=False)
    assert status == 413 and "5 MB" in answer["error"]
    assert sent < SLACK and time.monotonic() - started < 10


def test_a_body_within_the_limit_is_read_and_its_signature_checked(webhook_url):
    headers = {**_signed_headers(), "Content-Length": str(2 * CHUNK)}
    status, answer, sent = _send(webhook_url, headers, 2 * CHUNK, chunked=False)
    assert status == 401 and "does not match the body" in answer["error"] and sent == 2 * CHUNK
