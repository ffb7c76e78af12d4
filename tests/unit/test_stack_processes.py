"""The embedded stack's process handling on real processes and sockets: waiting for an HTTP
endpoint, stopping a process group (SIGTERM, then SIGKILL), and the remote-logging settings
Airflow gets for Elasticsearch (the credential mapping of ``logs.es_credentials``)."""

from __future__ import annotations

import base64
import http.server
import os
import sys
import threading
import time

import pytest

from gitops_ml import stack
from gitops_ml.config import Settings
from tests.helpers import free_port


def test_wait_http_gives_up_naming_the_url_and_the_last_problem(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/health"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"model server did not answer at {url} within 1 s \(.+\); see "):
        stack.wait_http(url, 1, "model server", tmp_path / "serve.log")
    assert time.monotonic() - started < 10


def test_wait_http_waits_through_errors_until_the_server_answers():
    class Handler(http.server.BaseHTTPRequestHandler):
        calls = 0

        def do_GET(self):  # the standard library's name
            Handler.calls += 1
            self.send_response(503 if Handler.calls < 3 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack.wait_http(f"http://127.0.0.1:{server.server_port}/", 30, "test server")
    finally:
        server.shutdown()
    assert Handler.calls == 3


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path):
    settings = Settings(home=tmp_path)
    ignore = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(600)"
    )
    pid = stack.start(settings, "stubborn", [sys.executable, "-c", ignore], {})
    log = tmp_path / "stack" / "stubborn.log"
    deadline = time.monotonic() + 30
    while "ready" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    assert stack.stop(settings, "stubborn", timeout=1) is True
    assert 1 <= time.monotonic() - started < 10
    assert not stack._alive(tmp_path / "stack" / "stubborn.pid")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert stack.stop(settings, "stubborn") is False  # nothing left to stop


def test_remote_logging_gets_the_credentials_of_the_log_shipper(tmp_path):
    assert stack.remote_logging_env(Settings(home=tmp_path)) == {}
    basic = stack.remote_logging_env(
        Settings(home=tmp_path, es_url="https://es:9200", es_username="u", es_password="p:w", es_ca_certs="/ca.pem")
    )
    assert basic["AIRFLOW__ELASTICSEARCH__HOST"] == "https://es:9200"
    assert base64.b64decode(basic["AIRFLOW__ELASTICSEARCH_CONFIGS__BASIC_AUTH"]).decode() == "u:p:w"
    assert basic["AIRFLOW__ELASTICSEARCH_CONFIGS__CA_CERTS"] == "/ca.pem"
    keyed = stack.remote_logging_env(
        Settings(home=tmp_path, es_url="https://es:9200", es_api_key="k", es_username="ignored")
    )
    assert keyed["AIRFLOW__ELASTICSEARCH_CONFIGS__API_KEY"] == "k"
    assert "AIRFLOW__ELASTICSEARCH_CONFIGS__BASIC_AUTH" not in keyed
