"""The pipeline DAG run in-process with ``dag.test()`` against real Git, DVC, MLflow and a real server."""

import importlib.util
import json

import pytest

from gitops_ml import demo, records, registry
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def load_dag():
    spec = importlib.util.spec_from_file_location("gitops_ml_pipeline_dag", ROOT / "dags" / "gitops_ml_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pipeline_dag


def task_states(run):
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def run_note(run) -> str:
    """The run's note as the Airflow UI shows it (read back from the Airflow DB)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(DagRun).where(DagRun.dag_id == run.dag_id, DagRun.run_id == run.run_id)).note or ""


def all_versions(settings):
    return registry.client(settings).search_model_versions(f"name = '{settings.model_name}'")


def test_two_commits_then_same_sha_again(airflow_db, settings, demo_repo, server):
    dag = load_dag()
    first_sha = demo_repo["commit_sha"]
    run = dag.test(run_conf={"commit_sha": first_sha})
    assert run.state == "success", task_states(run)
    assert server.version()["commit_sha"] == first_sha

    second_sha = demo.bump_param(demo_repo["path"], "train.learning_rate", 0.004, "tune the learning rate")
    run = dag.test(run_conf={"commit_sha": second_sha})
    assert run.state == "success", task_states(run)

    version = registry.find_version(settings, second_sha)
    tags = registry.version_tags(version)
    assert tags["commit_sha"] == second_sha and tags["data_hash"] == demo_repo["data_hash"]
    assert tags["branch"] == "main" and tags["repo_url"] == str(demo_repo["path"])
    assert tags["airflow_dag_id"] == "gitops_ml_pipeline" and tags["airflow_run_id"] == run.run_id
    mlflow_run = registry.client(settings).get_run(version.run_id)
    assert mlflow_run.data.tags["mlflow.source.git.commit"] == second_sha
    assert mlflow_run.data.metrics["test_accuracy"] > 0.8
    artifacts = {a.path for a in registry.client(settings).list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/learning_curves.png"} <= artifacts
    assert str(registry.get_alias(settings).version) == str(version.version)
    served = server.version()
    assert served["commit_sha"] == second_sha and served["model_version"] == str(version.version)
    assert served["data_hash"] == demo_repo["data_hash"] and served["airflow_run_id"] == run.run_id

    count = len(all_versions(settings))
    again = dag.test(run_conf={"commit_sha": second_sha})
    assert again.state == "success", task_states(again)
    states = task_states(again)
    assert states["train"] == states["register"] == "skipped" and states["deploy"] == "success"
    assert len(all_versions(settings)) == count == 2
    assert server.version()["commit_sha"] == second_sha
    assert run_note(run).endswith(f"PROMOTED: version {version.version} replaced version 1")
    assert run_note(again).endswith(f"SERVING: version {version.version} (already the champion)")

    docs = records.read(settings.records_dir / f"{second_sha}.jsonl")
    outcomes = {(d["labels"]["run_id"], d["event"]["action"]): d["event"]["outcome"] for d in docs}
    assert outcomes == {
        (run.run_id, "deploy"): "promoted",
        (run.run_id, "pipeline"): "success",
        (again.run_id, "deploy"): "unchanged",
        (again.run_id, "pipeline"): "success",
    }


def test_unknown_sha_fails_at_resolve_and_records_why(airflow_db, settings, demo_repo, server):
    dag = load_dag()
    missing = "0" * 40
    run = dag.test(run_conf={"commit_sha": missing})
    assert run.state == "failed"
    states = task_states(run)
    assert states["resolve_commit"] == "failed" and states["train"] == "upstream_failed"
    assert all_versions(settings) == [] and registry.get_alias(settings) is None
    assert server.version() is None
    docs = records.read(settings.records_dir / f"{missing}.jsonl")
    assert docs and docs[0]["event"]["outcome"] == "failure" and docs[0]["event"]["action"] == "resolve_commit"
    assert f"commit {missing} does not exist" in json.dumps(docs[0])
    assert run_note(run).startswith(f"FAILED in step resolve_commit: commit {missing} does not exist")
