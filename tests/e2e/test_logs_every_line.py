"""Every line a task writes reaches Elasticsearch, and the Airflow UI shows a finished task's
whole log from it: on a live ``airflow standalone`` (LocalExecutor: each task runs in the Task
SDK's supervised subprocess, which writes the task's local log file), for a task that succeeds
and one that crashes.

The tasks go through our adapter (``steps._adapter``) and write in every way a task writes:
our loggers, a library logger (``tensorflow``/``mlflow`` names), ``warnings.warn``
(``py.warnings``), ``print`` to stdout and stderr, a C-level ``write(2, ...)`` (as TensorFlow's
C++ runtime does), and an uncaught exception with its traceback. The count of lines of each
local log file equals the count of documents in Elasticsearch for that try and the count of
lines the REST API (what the UI shows) returns once the local file is gone.
"""

import json
import sys
import time
from pathlib import Path

import pytest

from gitops_ml import logs, stack
from gitops_ml.airflow.client import AirflowClient
from gitops_ml.airflow.remote_log import file_documents
from gitops_ml.config import Settings
from tests.helpers import free_port, task_log

pytestmark = pytest.mark.e2e

DAG_ID = "gitops_ml_logs_check"
SHA = "d" * 40
PASSWORD = "conn-PASSWORD-5521"

CHECK_DAG = (
    '''
import logging
import os
import sys
import warnings

from airflow.sdk import DAG, BaseHook, task
from gitops_ml.airflow.steps import _adapter


@_adapter
def talk():
    logging.getLogger("gitops_ml.check").info("our own line")
    logging.getLogger("tensorflow").warning("a TensorFlow logger line")
    logging.getLogger("mlflow.tracking").warning("an MLflow logger line")
    warnings.warn("a library warning", UserWarning)
    print("a line on stdout")
    print("a line on stderr", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, b"a C-level write to fd 2\\n")
    print("the password is", BaseHook.get_connection("gitops_ml_logs_check").password)


@_adapter
def crash():
    logging.getLogger("gitops_ml.check").info("about to crash")

    def inner_helper():
        raise ValueError("boom in our code")

    inner_helper()


with DAG("gitops_ml_logs_check", schedule=None, params={"commit_sha": "'''
    + SHA
    + """"},
         default_args={"retries": 0}) as dag:
    task(talk, task_id="talk")() >> task(crash, task_id="crash")()
"""
)


@pytest.fixture
def live_airflow(tmp_path, es, monkeypatch):
    """``airflow standalone`` over a DAG folder holding only the check DAG, with ``ES_URL`` set."""
    home = tmp_path / "home"
    monkeypatch.setenv("GITOPS_ML_HOME", str(home))
    monkeypatch.setenv(
        "AIRFLOW_CONN_GITOPS_ML_LOGS_CHECK",
        json.dumps({"conn_type": "http", "host": "example.com", "login": "me", "password": PASSWORD}),
    )
    settings = Settings.from_env()
    project = tmp_path / "project"
    (project / "dags").mkdir(parents=True)
    (project / "plugins").mkdir()
    (project / "dags" / "logs_check.py").write_text(CHECK_DAG)
    port = free_port()
    env = stack.airflow_env(settings, port, project_root=project)
    assert env.get("AIRFLOW__LOGGING__REMOTE_LOGGING") == "True"  # ES_URL set: the UI reads from Elasticsearch
    stack.start(settings, "airflow", [str(Path(sys.executable).parent / "airflow"), "standalone"], env)
    try:
        stack.wait_http(
            f"http://127.0.0.1:{port}/api/v2/monitor/health", 180, "Airflow", settings.home / "stack" / "airflow.log"
        )
        yield settings, AirflowClient(f"http://127.0.0.1:{port}")
    finally:
        stack.stop(settings, "airflow")


def file_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ui_lines(client: AirflowClient, run_id: str, task_id: str) -> list[dict]:
    content = task_log(client, DAG_ID, run_id, task_id)
    # Airflow's header: "::group::Log message source details", one line per source, "::endgroup::"
    end = next(i for i, line in enumerate(content) if line.get("event") == "::endgroup::")
    assert any("Elasticsearch" in line.get("event", "") for line in content[:end]), content[:end]
    return content[end + 1 :]


def test_every_line_of_a_task_reaches_elasticsearch_and_the_ui(live_airflow, es, tmp_path):
    settings, client = live_airflow
    es_client, _ = es
    client.wait_for_dag(DAG_ID)
    client.unpause(DAG_ID)
    run = client.trigger_commit(SHA, dag_id=DAG_ID)
    finished = client.wait_for_run(run["dag_run_id"], timeout=300, dag_id=DAG_ID)
    states = {ti["task_id"]: ti["state"] for ti in client.task_instances(run["dag_run_id"], DAG_ID)}
    assert finished["state"] == "failed" and states == {"talk": "success", "crash": "failed"}, states

    folder = settings.home / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run['dag_run_id']}"
    figures, kept, labels_of, seen = {}, {}, {}, {}
    for task_id in ("talk", "crash"):
        local = folder / f"task_id={task_id}" / "attempt=1.log"
        written = file_lines(local)
        log_id = f"{DAG_ID}-{task_id}-{run['dag_run_id']}--1-1"
        deadline = time.monotonic() + 30
        while True:  # the supervisor ships right after the task's process exits
            es_client.indices.refresh(index=f"{logs.LOGS_INDEX}*")
            docs = [
                h["_source"]
                for h in es_client.search(
                    index=f"{logs.LOGS_INDEX}*",
                    query={"term": {"log_id": log_id}},
                    size=10_000,
                    sort=[{"offset": "asc"}],
                )["hits"]["hits"]
            ]
            if len(docs) >= len(written) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        kept[task_id] = tmp_path / f"{task_id}.log"
        kept[task_id].write_bytes(local.read_bytes())
        local.unlink()  # what follows is read from Elasticsearch only
        shown = ui_lines(client, run["dag_run_id"], task_id)
        figures[task_id] = {"file": len(written), "es": len(docs), "ui": len(shown)}
        seen[task_id] = (written, docs, shown)
        print(
            f"\n{task_id}: local file {len(written)} lines, Elasticsearch {len(docs)} documents, UI {len(shown)} lines",
            flush=True,
        )
    for task_id, (written, docs, shown) in seen.items():
        labels_of[task_id] = docs[0]["labels"]
        assert len(docs) == len(written) == len(shown), figures[task_id]
        assert [d["offset"] for d in docs] == list(range(1, len(written) + 1))
        assert [d["message"].split("\n")[0] for d in docs] == [str(line.get("event", "")) for line in written]
        assert all(d["labels"]["commit_sha"] == SHA and d["labels"]["task_id"] == task_id for d in docs)
        assert all(d["service"]["name"] == "gitops-ml" and d["event"]["dataset"] == "gitops_ml.task" for d in docs)
        assert PASSWORD not in json.dumps(docs) and PASSWORD not in json.dumps(shown)
        loggers = {d["log"]["logger"] for d in docs}
        assert {"task", "gitops_ml.check"} <= loggers, loggers  # the task runner's own lines and ours
        if task_id == "talk":
            assert {"task.stdout", "task.stderr", "py.warnings", "tensorflow", "mlflow.tracking"} <= loggers, loggers
            messages = "\n".join(d["message"] for d in docs)
            for expected in (
                "our own line",
                "a TensorFlow logger line",
                "an MLflow logger line",
                "a library warning",
                "a line on stdout",
                "a line on stderr",
                "a C-level write to fd 2",
                "the password is ***",
            ):
                assert expected in messages, expected
        else:
            failure = [d for d in docs if "boom in our code" in d["message"]]
            assert failure, [d["message"] for d in docs]
            trace = failure[0]["error"]["stack_trace"]
            assert "Traceback (most recent call last)" in trace and "inner_helper" in trace, trace
            assert "ValueError: boom in our code" in trace
            shown_error = [line for line in shown if line.get("error_detail")]
            assert shown_error and "inner_helper" in json.dumps(shown_error[0]["error_detail"])

    def shipped_count():
        es_client.indices.refresh(index=f"{logs.LOGS_INDEX}*")
        return es_client.count(index=f"{logs.LOGS_INDEX}*", query={"term": {"labels.commit_sha": SHA}})["count"]

    assert shipped_count() == sum(f["file"] for f in figures.values())
    assert sorted(p.name for p in logs.spool_dir(settings.home).iterdir()) == []  # no preview, labels or segment left
    # The same file shipped again (a supervisor retrying, a deferred try resuming) adds nothing.
    for task_id, copy in kept.items():
        labels = labels_of[task_id]
        logs.replace_segment(settings.home, labels, file_documents(copy, labels))
        assert logs.ship(settings.home)["shipped"] == figures[task_id]["file"]
    assert shipped_count() == sum(f["file"] for f in figures.values())
    assert logs._segments(settings.home) == []
