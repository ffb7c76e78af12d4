"""A whole DAG run's log lines land in a real Elasticsearch, labelled with the commit SHA."""

import subprocess

import pytest

from gitops_ml import logs
from tests.conftest import BIN
from tests.e2e.test_dag import load_dag, task_states

pytestmark = pytest.mark.e2e


def test_pipeline_logs_are_queryable_by_sha(airflow_db, settings, demo_repo, server, es):
    client, _ = es
    run = load_dag().test(run_conf={"commit_sha": demo_repo["commit_sha"]})
    assert run.state == "success", task_states(run)
    docs = logs.search(settings.home, demo_repo["commit_sha"])
    tasks = {d["labels"]["task_id"] for d in docs}
    assert {"resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy",
            "record"} <= tasks
    assert all(d["labels"]["run_id"] == run.run_id and d["labels"]["dag_id"] == "gitops_ml_pipeline" for d in docs)
    assert any("epoch 12:" in d["message"] for d in docs if d["labels"]["task_id"] == "train")
    assert len({d["_id"] for d in docs}) == len(docs)
    assert logs._segments(settings.home) == []  # everything was delivered
    runs = client.search(index=logs.RUNS_INDEX, query={"term": {"labels.commit_sha": demo_repo["commit_sha"]}},
                         size=100)["hits"]["hits"]
    outcomes = {(h["_source"]["event"]["action"], h["_source"]["event"]["outcome"]) for h in runs}
    assert ("pipeline", "success") in outcomes and ("deploy", "promoted") in outcomes
    final = next(h["_source"] for h in runs if h["_source"]["event"]["action"] == "pipeline")
    assert final["deployed"] is True and final["test_accuracy"] > 0.8
    out = subprocess.run([str(BIN / "gitops-ml"), "logs", demo_repo["commit_sha"][:12], "--task", "deploy"],
                         capture_output=True, text=True, check=True).stdout
    assert "serving model version 1" in out and "train" not in out.split("\n")[0]
