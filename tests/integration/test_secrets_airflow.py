"""A repository URL with credentials written out (``GITOPS_ML_REPO_URL`` or the watch file) never
lands in the Airflow DB (serialized DAG, rendered template fields, trigger arguments, XCom, run
conf) nor in the task's rendered fields: the watcher runs for real (``dag.test()``, the deferral
path with its trigger inline) against a smart-HTTP remote that requires the credentials, and the
whole metadata DB is then searched for them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid

import pytest

from tests.git_http import GitHttpServer
from tests.helpers import commit_file, git

pytestmark = pytest.mark.integration

TOKEN = "glpat-LEAKME-8f2b"


def _db_text(airflow_home) -> str:
    connection = sqlite3.connect(airflow_home / "airflow.db")
    try:
        return "\n".join(connection.iterdump())
    finally:
        connection.close()


@pytest.fixture
def private_remote(tmp_path, demo_repo):
    """The demo repository as a bare remote behind HTTP Basic auth; a work clone to push from."""
    root = tmp_path / "srv"
    root.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(demo_repo["path"]), str(root / "models.git"))
    with GitHttpServer(root, username="oauth2", password=TOKEN) as server:
        yield {"server": server, "url": server.url("models.git"), "bare": root / "models.git"}


def test_watcher_with_a_literal_token_keeps_it_out_of_the_airflow_db(
    airflow_db, settings, demo_repo, private_remote, tmp_path, monkeypatch, capfd
):
    from airflow.models import Variable
    from airflow.sdk import BaseOperator  # noqa: F401 - Airflow configured by conftest

    from tests.e2e.test_watch_dags import load_watch_dags

    name = "s" + uuid.uuid4().hex[:10]
    config = tmp_path / "watch.yaml"
    config.write_text(
        json.dumps(
            {
                "repositories": [
                    {
                        "name": name,
                        "repo_url": private_remote["url"],
                        "branch": "main",
                        "poll_interval": 0.3,
                        "sensor_timeout": 60,
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("GITOPS_ML_WATCH_CONFIG", str(config))
    head = demo_repo["commit_sha"]
    Variable.set(f"gitops_ml_watch__{name}__last_sha", head)  # the sensor waits: it defers to its trigger

    pushed = []

    def push_later():
        time.sleep(2)
        work = tmp_path / "pusher"
        git(tmp_path, "clone", "-q", str(private_remote["bare"]), str(work))
        pushed.append(commit_file(work, "README.md", "docs\n", "docs"))
        git(work, "push", "-q", "origin", "HEAD:main")

    threading.Thread(target=push_later, daemon=True).start()
    dag = getattr(load_watch_dags(), f"watch__{name}")
    sensor = dag.get_task("wait_for_commit")
    assert "repo_url" not in sensor.template_fields and sensor.watch == name
    run = dag.test()
    assert run.state == "success" and pushed
    assert Variable.get(f"gitops_ml_watch__{name}__last_sha") == pushed[0]  # it really fetched over HTTP

    dump = _db_text(airflow_db)
    assert name in dump and pushed[0] in dump  # the DB holds the watcher's DAG, runs, XCom
    assert TOKEN not in dump, "the repository token is stored in the Airflow DB"
    assert "LEAKME" not in dump
    out = capfd.readouterr()
    assert "LEAKME" not in out.out + out.err


def test_default_watch_from_gitops_ml_repo_url_is_passed_by_name(airflow_db, settings, private_remote, monkeypatch):
    """The finding: ``GITOPS_ML_REPO_URL`` with a token became a template field of the sensor."""
    from airflow.serialization.serialized_objects import DagSerialization

    from tests.e2e.test_watch_dags import load_watch_dags

    monkeypatch.setenv("GITOPS_ML_REPO_URL", private_remote["url"])
    monkeypatch.delenv("GITOPS_ML_WATCH_CONFIG", raising=False)
    monkeypatch.setenv("GITOPS_ML_HOME", str(settings.home / "no-watch-file-here"))
    dag = load_watch_dags().watch__default
    sensor = dag.get_task("wait_for_commit")
    serialized = json.dumps(DagSerialization.to_dict(dag), default=str)
    assert "wait_for_commit" in serialized and TOKEN not in serialized and "LEAKME" not in serialized
    rendered = {field: getattr(sensor, field) for field in sensor.template_fields}
    assert TOKEN not in repr(rendered)
    assert sensor.poke({}) is not False  # the name resolves to the URL, credentials included, at run time
