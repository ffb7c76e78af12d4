"""Issue 11, part 2: the model server is safe by default.

Every test here talks to a real uvicorn server (the configuration ``serve`` uses:
``server.server_config``) on 127.0.0.1, in a thread of the test process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gitops_ml.config import Settings
from gitops_ml.deploy import server
from gitops_ml.deploy.client import ServingClient
from gitops_ml.deploy.controller import watch_window
from tests.helpers import free_port

CLASSES = ["zero", "one", "two"]


def confident_unless_bright(x: np.ndarray) -> np.ndarray:
    """A stand-in model: confident on dark images, low-confidence (top < 0.5) on bright ones."""
    bright = x.reshape(len(x), -1).mean(axis=1) > 0.5
    out = np.tile(np.array([[0.9, 0.05, 0.05]], np.float32), (len(x), 1))
    out[bright] = [0.34, 0.33, 0.33]
    return out


def model(version: str, predict=confident_unless_bright, class_names=CLASSES) -> server.ServedModel:
    return server.ServedModel(version, version * 40, "d" * 32, f"run{version}", class_names, 8, 8, 1, predict)


def png(size=(8, 8), value: int | None = None) -> bytes:
    pixels = (
        np.full(size[::-1], value, np.uint8)
        if value is not None
        else np.random.default_rng(0).integers(0, 100, size[::-1], dtype=np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


class Live:
    """``create_app`` behind the real uvicorn configuration, on a free loopback port."""

    def __init__(
        self,
        settings: Settings,
        alias: dict,
        models: dict,
        admin_without_token: bool = False,
        trusted_proxies: str = "",
    ):
        self.alias = alias
        self.loads: list[str | None] = []

        def loader(s, version):
            self.loads.append(version)
            return models[version or alias["champion"]]

        app = server.create_app(
            settings, loader=loader, alias_lookup=lambda s: alias["champion"], admin_without_token=admin_without_token
        )
        self.state: server.ServingState = app.state.serving
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = __import__("uvicorn").Server(server.server_config(app, "127.0.0.1", self.port, trusted_proxies))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def make_live(tmp_path):
    started = []

    def make(token: str = "", champion: str = "1", **kwargs) -> Live:
        alias = {"champion": champion}
        models = {"1": model("1"), "2": model("2"), "3": model("3")}
        live = Live(Settings(home=tmp_path, serving_token=token), alias, models, **kwargs)
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


def error_count(url: str, route: str, status: int) -> int:
    text = httpx.get(url + "/metrics").text
    line = f'gitops_ml_error_responses_total{{route="{route}",status="{status}"}} '
    return next((int(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0)


# --- admin -----------------------------------------------------------------------------------------------


def test_serve_refuses_to_start_off_loopback_without_a_token(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: nothing is ever bound there.
    env = {k: v for k, v in os.environ.items() if k != "GITOPS_ML_SERVING_TOKEN"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gitops-ml"), "serve", "--host", "192.0.2.1", "--port", str(free_port())],
        env={**env, "GITOPS_ML_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refusing to serve on 192.0.2.1" in done.stderr and "GITOPS_ML_SERVING_TOKEN" in done.stderr
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(server.UnsafeServerConfig, match="GITOPS_ML_SERVING_TOKEN"):
            server.check_exposure(Settings(home=tmp_path), host)
    for host in ("127.0.0.1", "::1", "localhost"):
        server.check_exposure(Settings(home=tmp_path), host)  # the embedded demo
    server.check_exposure(Settings(home=tmp_path, serving_token="s3cret"), "0.0.0.0")


def test_admin_needs_the_token_or_a_direct_loopback_peer(make_live):
    with_token = make_live(token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = httpx.post(with_token.url + "/admin/reload", json={}, headers=headers)
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
    ok = httpx.post(with_token.url + "/admin/reload", json={}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"

    no_token = make_live()  # create_app's default: no token, no admin
    refused = httpx.post(no_token.url + "/admin/reload", json={})
    assert refused.status_code == 401 and "needs GITOPS_ML_SERVING_TOKEN" in refused.json()["error"]

    demo = make_live(admin_without_token=True)  # what `serve --host 127.0.0.1` builds without a token
    assert httpx.post(demo.url + "/admin/reload", json={}).status_code == 200
    proxied = httpx.post(demo.url + "/admin/reload", json={}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 401 and "direct loopback clients" in proxied.json()["error"]
    assert error_count(demo.url, "reload", 401) == 1


@pytest.mark.parametrize("version", ["\u0663", "\uff13", "3.0", "-3", "1234567890", "3 ", True, [3], ""])
def test_version_strings_are_ascii_digits(make_live, version):
    live = make_live(admin_without_token=True, champion="3")
    response = httpx.post(live.url + "/admin/reload", json={"model_version": version})
    assert response.status_code == 400, response.text
    assert "1 to 9 ASCII digits" in response.json()["error"]
    assert httpx.get(live.url + "/version").json()["model_version"] == "3"  # still the start-up load
    assert live.loads == [None]


def test_reload_serves_only_the_version_the_champion_alias_names(make_live):
    live = make_live(admin_without_token=True)
    refused = httpx.post(live.url + "/admin/reload", json={"model_version": "2"})
    assert refused.status_code == 409
    body = refused.json()
    assert body["wanted_version"] == "2" and body["alias_version"] == "1"
    assert "champion names version 1" in body["error"] and "still serving 1" in body["error"]
    assert httpx.get(live.url + "/version").json()["model_version"] == "1" and live.loads == [None]

    live.alias["champion"] = "2"  # deploy: the alias moves first, then the reload
    assert httpx.post(live.url + "/admin/reload", json={"model_version": "2"}).json()["model_version"] == "2"
    live.alias["champion"] = "1"  # rollback: the alias moves back first
    assert httpx.post(live.url + "/admin/reload", json={"model_version": "1"}).json()["model_version"] == "1"
    assert live.loads == [None, "2"]  # the rollback was a swap back, not a load
    live.alias["champion"] = "3"
    assert httpx.post(live.url + "/admin/reload", json={}).json()["model_version"] == "3"
    live.alias["champion"] = None
    gone = httpx.post(live.url + "/admin/reload", json={"model_version": "3"})
    assert gone.status_code == 409 and gone.json()["alias_version"] is None
    assert httpx.get(live.url + "/version").json()["model_version"] == "3"


def test_default_alias_lookup_reads_the_real_registry(tmp_path):
    """``create_app``'s default ``alias_lookup`` asks MLflow: a version that is not champion is refused."""
    from mlflow import MlflowClient

    from gitops_ml import registry

    settings = Settings(home=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlc = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    mlc.create_registered_model(settings.model_name)
    for _ in range(2):
        mlc.create_model_version(settings.model_name, source=str(tmp_path / "artifacts"))
    registry.set_alias(settings, "1")
    assert server.champion_version(settings) == "1"
    models = {"1": model("1"), "2": model("2")}
    app = server.create_app(settings.with_overrides(serving_token="x"), loader=lambda s, v: models[v or "1"])
    from starlette.testclient import TestClient

    auth = {"Authorization": "Bearer x"}
    with TestClient(app) as client:
        refused = client.post("/admin/reload", json={"model_version": "2"}, headers=auth)
        assert refused.status_code == 409 and refused.json()["alias_version"] == "1"
        registry.set_alias(settings, "2")
        assert client.post("/admin/reload", json={"model_version": "2"}, headers=auth).status_code == 200


# --- watch window ----------------------------------------------------------------------------------------


def _watch_after_switch(live: Live, traffic) -> dict:
    """Switch the server from version 1 to 2 as a deploy does, then run the watch window beside ``traffic``."""
    settings = Settings(home=Path("/nonexistent"), serving_url=live.url)
    client = ServingClient(settings)
    dark = png(value=10)
    for _ in range(20):  # version 1's own (confident) history, the comparison base
        assert httpx.post(live.url + "/predict", content=dark, headers={"content-type": "image/png"}).is_success
    before = {live.url: client.metrics()}
    live.alias["champion"] = "2"
    client.reload("2", timeout=10)
    policy = {
        "watch_seconds": 3,
        "min_requests": 20,
        "min_clients": 3,
        "max_error_rate": 0.05,
        "max_latency_ratio": 1000.0,
        "max_low_confidence_increase": 0.2,
    }
    result: dict = {}
    watcher = threading.Thread(target=lambda: result.update(watch_window([client], "2", "1", before, policy)))
    watcher.start()
    time.sleep(0.6)  # after the watch window's first scrape
    traffic()
    watcher.join(20)
    client.close()
    return result


def bright_requests(count: int, local_address: str = "127.0.0.1", headers: dict | None = None) -> None:
    transport = httpx.HTTPTransport(local_address=local_address)
    with httpx.Client(transport=transport, timeout=10) as http:
        for i in range(count):
            extra = {k: v.format(i=i) for k, v in (headers or {}).items()}
            response = http.post(
                LIVE_URL[0] + "/predict", content=png(value=250), headers={"content-type": "image/png", **extra}
            )
            assert response.status_code == 200


LIVE_URL: list[str] = []


def test_one_client_cannot_roll_back_a_healthy_version(make_live):
    live = make_live(admin_without_token=True)
    LIVE_URL[:] = [live.url]
    # 40 low-confidence requests from one peer, half of them claiming other clients via X-Forwarded-For
    verdict = _watch_after_switch(
        live, lambda: (bright_requests(20), bright_requests(20, headers={"X-Forwarded-For": "198.51.100.{i}"}))
    )
    assert verdict["verdict"] == "healthy", verdict
    stats = verdict["stats"]
    assert stats["clients"] == 1 and stats["requests"] == 10  # capped: one client, ten judged requests


def test_the_watch_window_still_rolls_back_when_many_clients_see_it(make_live):
    live = make_live(admin_without_token=True)
    LIVE_URL[:] = [live.url]
    clients = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # all of 127/8 is loopback on Linux
    verdict = _watch_after_switch(live, lambda: [bright_requests(10, c) for c in clients])
    assert verdict["verdict"] == "rolled_back" and "low-confidence" in verdict["reason"], verdict


# --- decoding off the event loop, pixel budget ------------------------------------------------------------


def big_png(side: int) -> str:
    return base64.b64encode(png((side, side), value=128)).decode()


def test_a_good_request_answers_while_worst_case_requests_decode(make_live):
    live = make_live()
    # within every limit: 16 images of 2000 x 2000 = 64,000,000 pixels, a few kB each (flat grey PNGs);
    # each such request costs about 0.4 s of decoding; ten of them decoded on the event loop would hold a
    # good request for seconds
    worst = json.dumps({"images": [big_png(2000)] * 16}).encode()
    assert len(worst) < server.MAX_BODY_BYTES
    finished: list[float] = []

    def send_worst() -> None:
        response = httpx.post(
            live.url + "/predict", content=worst, headers={"content-type": "application/json"}, timeout=120
        )
        assert response.status_code == 200 and len(response.json()["predictions"]) == 16
        finished.append(time.monotonic())

    senders = [threading.Thread(target=send_worst) for _ in range(10)]
    for sender in senders:
        sender.start()
    time.sleep(0.3)
    started = time.monotonic()
    good = httpx.post(live.url + "/predict", content=png(), headers={"content-type": "image/png"}, timeout=60)
    answered = time.monotonic()
    for sender in senders:
        sender.join(120)
    assert good.status_code == 200
    assert answered - started < 0.5, f"a good request waited {answered - started:.2f} s"
    assert len(finished) == 10 and max(finished) > answered, "the worst-case requests were not in flight"


def test_pixel_budget_is_per_request_and_names_the_image(make_live):
    live = make_live()
    over = json.dumps({"images": [big_png(2000)] * 17}).encode()
    started = time.monotonic()
    response = httpx.post(live.url + "/predict", content=over, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "images[16] brings the request to 68,000,000 pixels" in response.json()["error"]
    assert time.monotonic() - started < 2.0  # refused from the headers, nothing decoded
    assert error_count(live.url, "predict", 413) == 1


# --- bodies, connections, errors --------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _read_reply(sock: socket.socket) -> bytes:
    """One HTTP response with a JSON body (read until the body's closing brace or the connection closes)."""
    reply = b""
    try:
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except (ConnectionResetError, TimeoutError):
        pass
    return reply


def test_a_chunked_upload_is_cut_off_at_the_limit(make_live):
    live = make_live()
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS
    peak_before = _peak_rss_mb()
    chunk = b"x" * (1024 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 256 * 1024 * 1024:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"over the limit of 16777216 bytes" in reply
    grown = _peak_rss_mb() - peak_before
    assert grown < 64, f"the server's process grew by {grown:.0f} MB for a {sent >> 20} MB upload"


def test_a_chunked_body_over_the_limit_is_answered_before_the_client_finishes(make_live):
    """Reading stops at the limit: the 413 arrives while the client still holds the rest of the body."""
    live = make_live()
    chunk = b"x" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(server.MAX_BODY_BYTES // len(chunk) + 1):  # one chunk past the limit, no final chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = _read_reply(sock)  # the body is unfinished: only an answer mid-stream can arrive here
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == f"request body is over the limit of {server.MAX_BODY_BYTES} bytes"
    assert live.state.inflight_body_bytes == 0  # the budget is given back
    assert error_count(live.url, "predict", 413) == 1
    assert (
        'gitops_ml_requests_total{model_version="1",outcome="bad_request"} 1' in httpx.get(live.url + "/metrics").text
    )


def test_a_declared_body_over_the_limit_is_refused_from_the_headers(make_live):
    live = make_live(admin_without_token=True)
    for path, route in (("/predict", "predict"), ("/admin/reload", "reload")):
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
            sock.sendall(
                b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (path.encode(), server.MAX_BODY_BYTES + 1)
            )
            reply = _read_reply(sock)  # not one body byte sent
        assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == (
            f"request body of {server.MAX_BODY_BYTES + 1} bytes is over the limit of {server.MAX_BODY_BYTES} bytes"
        )
        assert error_count(live.url, route, 413) == 1
    assert live.loads == [None]


def test_a_body_that_does_not_arrive_in_time_is_a_json_408(make_live, monkeypatch):
    # Not a fake: the real limit, shortened from 30 s so a real slow client reaches it within the test.
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 1.0)
    live = make_live()
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
        )
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"request body not received within 1 s" in reply and time.monotonic() - started < 5
    assert live.state.inflight_body_bytes == 0


def test_bodies_in_flight_share_one_budget(make_live, monkeypatch):
    # Not a fake: the real budget, lowered from 256 MiB so two real uploads exhaust it without that much RAM.
    monkeypatch.setattr(server, "MAX_INFLIGHT_BODY_BYTES", 1000)
    live = make_live()
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as slow:
        slow.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 2000\r\n\r\n" + b"x" * 900
        )  # holds 900 bytes of the budget
        deadline = time.monotonic() + 10
        while live.state.inflight_body_bytes < 900 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.state.inflight_body_bytes == 900
        busy = httpx.post(live.url + "/predict", content=png(), headers={"content-type": "image/png"})
        assert busy.status_code == 503 and "busy receiving other uploads" in busy.json()["error"]
    deadline = time.monotonic() + 10
    while live.state.inflight_body_bytes and time.monotonic() < deadline:  # the slow client went away
        time.sleep(0.02)
    assert live.state.inflight_body_bytes == 0
    ok = httpx.post(live.url + "/predict", content=png(), headers={"content-type": "image/png"})
    assert ok.status_code == 200


def test_an_idle_connection_and_a_dribbled_head_are_closed(make_live):
    live = make_live()
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server, nothing sent
        assert time.monotonic() - started < server.HEAD_TIMEOUT_S + 3
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.monotonic() - started < 15:
            try:
                slow.sendall(b"X-Slow: y\r\n")
                slow.settimeout(1.0)
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed and time.monotonic() - started < server.HEAD_TIMEOUT_S + 3
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as huge:
        huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (server.MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
        assert huge.recv(100).startswith(b"HTTP/1.1 400")
    assert httpx.get(live.url + "/health").status_code == 200


def test_deeply_nested_json_is_a_counted_json_400(make_live):
    live = make_live(admin_without_token=True)
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, route in (("/predict", "predict"), ("/admin/reload", "reload")):
        response = httpx.post(live.url + path, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "nested too deeply" in response.json()["error"]
        assert error_count(live.url, route, 400) == 1
    assert (
        'gitops_ml_requests_total{model_version="1",outcome="bad_request"} 1' in httpx.get(live.url + "/metrics").text
    )


def test_every_error_is_json_and_counted(tmp_path):
    """Not found, wrong method, and an unexpected exception: JSON bodies, counted by route and status."""
    broken = {
        "1": model(
            "1", predict=lambda x: np.tile([[0.0, 0.0, 1.0]], (len(x), 1)).astype(np.float32), class_names=["only"]
        )
    }  # names[2] raises IndexError while building the answer
    live = Live(Settings(home=tmp_path), {"champion": "1"}, broken)
    try:
        missing = httpx.get(live.url + "/nope")
        assert missing.status_code == 404 and missing.json()["error"] == "Not Found"
        wrong = httpx.get(live.url + "/predict")
        assert wrong.status_code == 405 and "error" in wrong.json()
        crash = httpx.post(live.url + "/predict", content=png(), headers={"content-type": "image/png"})
        assert crash.status_code == 500 and crash.json()["error"] == "internal server error (IndexError)"
        assert error_count(live.url, "other", 404) == 1 and error_count(live.url, "predict", 405) == 1
        assert error_count(live.url, "predict", 500) == 1
    finally:
        live.stop()
