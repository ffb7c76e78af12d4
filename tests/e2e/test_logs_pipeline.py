"""A whole DAG run's log lines land in a real Elasticsearch, labelled with the commit SHA."""

import contextlib
import json
import subprocess
import threading
import time

import pytest

from gitops_ml import logs
from tests.e2e.test_dag import load_dag, task_states
from tests.helpers import BIN

pytestmark = pytest.mark.e2e


def test_pipeline_logs_are_queryable_by_sha(airflow_db, settings, demo_repo, server, es):
    client, _ = es
    run = load_dag().test(run_conf={"commit_sha": demo_repo["commit_sha"]})
    assert run.state == "success", task_states(run)
    docs = logs.search(settings.home, demo_repo["commit_sha"])
    tasks = {d["labels"]["task_id"] for d in docs}
    assert {
        "resolve_commit",
        "prepare_workspace",
        "pull_data",
        "train",
        "evaluate",
        "register",
        "deploy",
        "record",
    } <= tasks
    assert all(d["labels"]["run_id"] == run.run_id and d["labels"]["dag_id"] == "gitops_ml_pipeline" for d in docs)
    assert any("epoch 12:" in d["message"] for d in docs if d["labels"]["task_id"] == "train")
    assert len({d["_id"] for d in docs}) == len(docs)
    assert logs._segments(settings.home) == []  # everything was delivered
    runs = client.search(
        index=logs.RUNS_INDEX, query={"term": {"labels.commit_sha": demo_repo["commit_sha"]}}, size=100
    )["hits"]["hits"]
    outcomes = {(h["_source"]["event"]["action"], h["_source"]["event"]["outcome"]) for h in runs}
    assert ("pipeline", "success") in outcomes and ("deploy", "promoted") in outcomes
    final = next(h["_source"] for h in runs if h["_source"]["event"]["action"] == "pipeline")
    assert final["deployed"] is True and final["test_accuracy"] > 0.8
    out = subprocess.run(
        [str(BIN / "gitops-ml"), "logs", demo_repo["commit_sha"][:12], "--task", "deploy"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "serving model version 1" in out and "train" not in out.split("\n")[0]


def test_elasticsearch_stopped_during_a_dag_run_loses_nothing(airflow_db, settings, demo_repo, server, es, monkeypatch):
    """ES goes down while `train` runs and comes back during `evaluate`: the run succeeds, the last
    task delivers what the outage held back, and the count of documents for the SHA equals the
    count of lines the tasks logged (counted by the spool handlers themselves)."""
    client, node = es
    if node is None:
        pytest.fail("this test stops and starts the node it started; unset ES_URL to run it")
    logged: dict[str, int] = {}
    real_capture = logs.capture

    # A spy, not a fake: the real capture runs; we only note how many lines each task's handler logged.
    @contextlib.contextmanager
    def counting_capture(home, labels, **options):
        with real_capture(home, labels, **options) as handler:
            try:
                yield handler
            finally:
                logged[f"{labels['task_id']}-{labels['try_number']}"] = handler.offset

    monkeypatch.setattr(logs, "capture", counting_capture)
    spool = logs.spool_dir(settings.home)
    events: list[str] = []

    def outage():
        def wait_for(task_id):
            while not any(f"__{task_id}__" in p.name for p in spool.glob("*.jsonl")):
                time.sleep(0.05)

        wait_for("train")
        node.stop()
        events.append("stopped")
        wait_for("evaluate")
        node.start()
        events.append("started")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    run = load_dag().test(run_conf={"commit_sha": demo_repo["commit_sha"]})
    thread.join(timeout=180)
    assert events == ["stopped", "started"]
    assert run.state == "success", task_states(run)
    assert logs._segments(settings.home) == []  # the later tasks delivered what the outage held back
    docs = logs.search(settings.home, demo_repo["commit_sha"], client=client)
    assert len(docs) == sum(logged.values()) and len(logged) == 8
    by_try: dict[str, list[int]] = {}
    for doc in docs:
        by_try.setdefault(doc["log_id"], []).append(doc["offset"])
    assert all(sorted(offsets) == list(range(1, len(offsets) + 1)) for offsets in by_try.values())
    assert any("epoch" in d["message"] for d in docs if d["labels"]["task_id"] == "train")


SECRETS_DAG = """
import logging
from airflow.sdk import DAG, BaseHook, task
from gitops_ml.airflow.steps import _adapter

@_adapter
def leaky():
    connection = BaseHook.get_connection("gitops_ml_test_repo")
    logging.getLogger("gitops_ml.test").info("password is %s", connection.password)
    logging.getLogger("gitops_ml.test").info("uri is %s", connection.get_uri())
    logging.getLogger("gitops_ml.test").info("cloning https://deploy:ghp_URLTOKEN99@git.example.com/m.git")

with DAG("gitops_ml_secrets_check", schedule=None, params={"commit_sha": "c" * 40}) as dag:
    task(leaky, task_id="leaky")()
"""


def synced_dag(tmp_path, filename: str, source: str, dag_id: str):
    """A DAG folder holding one file, synced to the metadata DB as the dag processor does; its DAG."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / filename).write_text(source)
    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=folder, bundle_path=folder, bundle_name="dags-folder")
    sync_bag_to_db(bag, "dags-folder", None)
    return bag.get_dag(dag_id)


def test_connection_password_and_url_token_never_shipped(airflow_db, settings, es, monkeypatch, tmp_path):
    """A task (through our adapter) reads an Airflow connection and logs its password, its URI and a
    repository URL with a token: no document in Elasticsearch contains either secret."""
    client, _ = es
    monkeypatch.setenv(
        "AIRFLOW_CONN_GITOPS_ML_TEST_REPO",
        json.dumps(
            {"conn_type": "http", "host": "git.example.com", "login": "deploy", "password": "conn-PASSWORD-7781"}
        ),
    )
    run = synced_dag(tmp_path, "secrets_check.py", SECRETS_DAG, "gitops_ml_secrets_check").test()
    assert run.state == "success"
    docs = logs.search(settings.home, "c" * 40, client=client)
    messages = [d["message"] for d in docs if d["labels"]["task_id"] == "leaky"]
    assert len(messages) == 3, messages
    shipped = json.dumps(docs)
    assert "conn-PASSWORD-7781" not in shipped and "ghp_URLTOKEN99" not in shipped
    assert "password is ***" in messages[0]
