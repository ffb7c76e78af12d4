"""``AirflowClient`` retries transient failures of the Airflow REST API, and only those.

These run against a real HTTP server on 127.0.0.1 scripted to answer 500 a few times, then 200
(or 4xx, or 409), because that fault cannot be caused on demand in a real Airflow: the embedded
Airflow answers 500 "Database error" only when another writer happens to hold SQLite's lock at the
moment of the request (seen when a trigger raced the watcher, issue 15). What the client does with
a real Airflow's answers (run conf, 409 on an existing run) is tested in ``test_trigger_conf.py``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise

import pytest

from gitops_ml.airflow.client import AirflowClient
from gitops_ml.errors import GitopsMLError
from tests.helpers import free_port

SHA = "a" * 40
RUN_ID = f"commit__{SHA}"


class ScriptedAirflow:
    """A loopback server: ``script[(method, path)]`` is a list of status codes answered in turn
    (the last one repeats); every request is recorded with its time."""

    def __init__(self, script: dict[tuple[str, str], list[int]], port: int = 0):
        self.script = {key: list(codes) for key, codes in script.items()}
        self.requests: list[tuple[float, str, str, dict | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append((time.monotonic(), self.command, self.path, body))
                codes = outer.script.get((self.command, self.path), [404])
                code = codes.pop(0) if len(codes) > 1 else codes[0]
                if self.path == "/auth/token" and code == 200:
                    payload = {"access_token": "token"}
                elif code in (200, 201):
                    payload = {"dag_run_id": RUN_ID, "state": "queued", "conf": (body or {}).get("conf")}
                else:
                    payload = {"detail": f"scripted {code}"}
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def calls(self, method: str, path: str) -> list[float]:
        return [t for t, m, p, _ in self.requests if (m, p) == (method, path)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


RUNS = "/api/v2/dags/gitops_ml_pipeline/dagRuns"


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        server = ScriptedAirflow({("GET", "/auth/token"): [200], **script})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_500_three_times_then_created_is_retried_with_growing_waits(scripted):
    server = scripted({("GET", f"{RUNS}/{RUN_ID}"): [404], ("POST", RUNS): [500, 500, 500, 200]})
    client = AirflowClient(server.url, retry_seconds=30, backoff=0.2, max_backoff=5)
    run = client.trigger_commit(SHA, conf={"repo_url": "/srv/repo", "branch": "main"})
    assert run["dag_run_id"] == RUN_ID
    posts = server.calls("POST", RUNS)
    assert len(posts) == 4, f"expected 3 failed attempts and 1 success, the server saw {len(posts)} POSTs"
    gaps = [b - a for a, b in pairwise(posts)]
    assert gaps[0] >= 0.15 and gaps[2] > gaps[0] * 1.5, f"waits between attempts did not grow: {gaps}"
    bodies = [body for _, m, p, body in server.requests if (m, p) == ("POST", RUNS)]
    assert all(b == bodies[0] for b in bodies), "a retry sent another body than the first attempt"


def test_500_on_the_token_request_is_retried_too(scripted):
    server = scripted({("GET", "/auth/token"): [503, 502, 200]})
    AirflowClient(server.url, retry_seconds=30, backoff=0.05)
    assert len(server.calls("GET", "/auth/token")) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_4xx_is_not_retried(scripted, status):
    server = scripted({("GET", f"{RUNS}/{RUN_ID}"): [404], ("POST", RUNS): [status]})
    client = AirflowClient(server.url, retry_seconds=30, backoff=0.05)
    with pytest.raises(GitopsMLError, match=f"refused to trigger {RUN_ID}: HTTP {status}"):
        client.trigger_commit(SHA)
    assert len(server.calls("POST", RUNS)) == 1, f"HTTP {status} was retried"


def test_409_keeps_meaning_the_run_exists(scripted):
    """Created by the watcher between our GET and our POST: the existing run is returned, no retry."""
    server = scripted({("GET", f"{RUNS}/{RUN_ID}"): [404, 200], ("POST", RUNS): [409]})
    client = AirflowClient(server.url, retry_seconds=30, backoff=0.05)
    assert client.trigger_commit(SHA)["dag_run_id"] == RUN_ID
    assert len(server.calls("POST", RUNS)) == 1
    assert len(server.calls("GET", f"{RUNS}/{RUN_ID}")) == 2


def test_409_after_a_retried_500_on_a_rerun_is_our_own_first_attempt(scripted):
    """A 500 can come after the run was written (the commit succeeded, the answer failed): the
    retry's 409 then names the run we created, not somebody else's."""
    run_id_prefix = f"{RUNS}/{RUN_ID}__rerun_"
    server = scripted({("POST", RUNS): [500, 409]})
    client = AirflowClient(server.url, retry_seconds=30, backoff=0.05)
    with pytest.raises(GitopsMLError, match="refused to read run"):  # the scripted GET answers 404
        client.trigger_commit(SHA, rerun=True)
    assert len(server.calls("POST", RUNS)) == 2
    assert any(p.startswith(run_id_prefix) for _, m, p, _ in server.requests if m == "GET")


def test_rerun_409_on_first_attempt_is_an_error(scripted):
    server = scripted({("POST", RUNS): [409]})
    client = AirflowClient(server.url, retry_seconds=30, backoff=0.05)
    with pytest.raises(GitopsMLError, match="HTTP 409"):
        client.trigger_commit(SHA, rerun=True)


def test_persistent_500_gives_up_within_the_time_bound(scripted):
    server = scripted({("GET", f"{RUNS}/{RUN_ID}"): [500]})
    client = AirflowClient(server.url, retry_seconds=2, backoff=0.1, max_backoff=0.4)
    started = time.monotonic()
    with pytest.raises(GitopsMLError, match=f"refused to read run {RUN_ID}: HTTP 500"):
        client.get_run(RUN_ID)
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, f"retries took {elapsed:.1f} s, over the 2 s bound"
    assert len(server.calls("GET", f"{RUNS}/{RUN_ID}")) >= 4, "gave up before retrying"


def test_connection_refused_is_retried_then_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(GitopsMLError) as caught:
        AirflowClient(url, retry_seconds=1.5, backoff=0.1, max_backoff=0.3)
    elapsed = time.monotonic() - started
    assert url in str(caught.value) and "connection failed on every attempt" in str(caught.value)
    assert "ConnectError" in str(caught.value)
    assert 0.5 < elapsed < 3.5, f"gave up after {elapsed:.1f} s: not retried, or not bounded"


def test_connection_refused_then_server_up_succeeds():
    """Airflow's API server still starting (connection refused) when the CLI calls it."""
    port = free_port()
    started: list[ScriptedAirflow] = []
    timer = threading.Timer(0.8, lambda: started.append(ScriptedAirflow({("GET", "/auth/token"): [200]}, port)))
    timer.start()
    try:
        client = AirflowClient(f"http://127.0.0.1:{port}", retry_seconds=20, backoff=0.1, max_backoff=0.5)
        assert client.attempts >= 2, "the first attempt cannot have reached a server that was not listening"
        assert started and len(started[0].calls("GET", "/auth/token")) == 1
    finally:
        timer.join()
        for server in started:
            server.close()
