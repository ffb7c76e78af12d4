"""The last task of a run (``record``) waits for Elasticsearch only when Elasticsearch is configured.

Without ``ES_URL`` nothing tries to ship and nothing waits: the spool keeps the lines for
``gitops-ml logs``. With ``ES_URL`` set and the node down, the bounded wait
(``GITOPS_ML_SHIP_WAIT_SECONDS``) stays, so an outage during a run is delivered before it ends
when it can be, and the lines stay in the spool when it cannot.
"""

import pytest

from gitops_ml import logs
from gitops_ml.config import Settings
from tests.e2e.test_logs_pipeline import synced_dag
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

SHA = "e" * 40

RECORD_DAG = (
    '''
import logging
from airflow.sdk import DAG, task
from gitops_ml.airflow.steps import _adapter

@_adapter
def record():
    logging.getLogger("gitops_ml.check").info("recording the outcome")

with DAG("gitops_ml_record_wait_check", schedule=None, params={"commit_sha": "'''
    + SHA
    + """"}) as dag:
    task(record, task_id="record")()
"""
)


def run_record_task(tmp_path):
    """``dag.test()`` of a one-task DAG whose task is named ``record`` (the one that waits); its duration
    (of a second run, once the process is warm)."""
    dag = synced_dag(tmp_path, "record_wait_check.py", RECORD_DAG, "gitops_ml_record_wait_check")
    seconds = []
    for _ in range(2):  # the first task of a process also starts the in-process execution API: not ours
        run = dag.test()
        ti = next(ti for ti in run.get_task_instances() if ti.task_id == "record")
        assert run.state == "success", ti.state
        seconds.append((ti.end_date - ti.start_date).total_seconds())
    return seconds[-1]


def spooled_messages(home):
    return [d["message"] for p in logs._segments(home) for d in logs.read_segment(p)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GITOPS_ML_HOME", str(tmp_path / "home"))
    return Settings.from_env().home


def test_without_elasticsearch_record_does_not_wait(airflow_db, home, tmp_path, monkeypatch):
    monkeypatch.delenv("ES_URL", raising=False)
    monkeypatch.delenv("GITOPS_ML_SHIP_WAIT_SECONDS", raising=False)  # the default: 60 s
    seconds = run_record_task(tmp_path)
    print(f"\nrecord without ES_URL: {seconds:.2f} s", flush=True)
    assert seconds < 15, seconds  # was 60 s (the default wait) before
    messages = spooled_messages(home)
    assert messages == ["recording the outcome"] * 2  # kept for `gitops-ml logs` (two runs)
    assert logs.search(home, SHA, task_id="record")[0]["message"] == "recording the outcome"


def test_with_elasticsearch_configured_and_down_the_bounded_wait_stays(airflow_db, home, tmp_path, monkeypatch):
    # A port where nothing listens: Elasticsearch is down.
    monkeypatch.setenv("ES_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GITOPS_ML_SHIP_WAIT_SECONDS", "6")  # retries after 0.5, 1 and 2 s: about 3.5 s
    seconds = run_record_task(tmp_path)
    print(f"\nrecord with ES configured and down (GITOPS_ML_SHIP_WAIT_SECONDS=6): {seconds:.2f} s", flush=True)
    assert 3.4 <= seconds < 30, seconds
    messages = spooled_messages(home)
    assert "recording the outcome" in messages  # undelivered: stays for the next shipment
