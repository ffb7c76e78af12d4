"""Fixtures of the end-to-end tests that run against the live embedded stack."""

from __future__ import annotations

import json
import os

import pytest

from gitops_ml import stack
from tests.helpers import free_port


@pytest.fixture
def live_stack(settings, demo_repo, tmp_path, monkeypatch, request):
    """``airflow standalone`` + MLflow + the model server, the demo repository watched (poll every second)
    by the watcher DAG in the scheduler and triggerer.

    Elasticsearch only for a test that also asks for ``es``: then task logs go to it and the Airflow UI
    reads finished tries back from it (``[logging] remote_logging``).  Yields the URLs, the ports and the
    settings the stack was started with (to start it again on the same ports).
    """
    config = tmp_path / "watch.yaml"
    config.write_text(
        json.dumps(
            {
                "repositories": [
                    {
                        "name": "default",
                        "repo_url": str(demo_repo["path"]),
                        "branch": "main",
                        "poll_interval": 1,
                        "retrain_schedule": None,
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    if "es" in request.fixturenames:
        request.getfixturevalue("es")
        # ``settings`` was read before the ``es`` fixture exported ES_URL: the stack reads Elasticsearch from it.
        settings = settings.with_overrides(es_url=os.environ["ES_URL"])
    else:
        monkeypatch.delenv("ES_URL", raising=False)
    ports = {
        "airflow_port": free_port(),
        "mlflow_port": free_port(),
        "serve_port": int(settings.serving_url.rsplit(":", 1)[1]),
    }
    try:
        urls = stack.up(settings, **ports)
        yield {**urls, "ports": ports, "settings": settings}
    finally:
        stack.down(settings)
