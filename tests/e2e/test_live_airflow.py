"""The whole path on a live Airflow (``airflow standalone``: scheduler, dag-processor, triggerer,
API server, LocalExecutor on SQLite), started by the test like ``make demo`` does."""

import httpx
import pytest

from gitops_ml import registry, stack
from gitops_ml.airflow.client import AirflowClient
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def live_stack(settings):
    ports = {"airflow_port": free_port(), "mlflow_port": free_port(),
             "serve_port": int(settings.serving_url.rsplit(":", 1)[1])}
    try:
        urls = stack.up(settings, **ports)
        yield urls
    finally:
        stack.down(settings)


def test_trigger_names_run_after_commit_and_serves_it(settings, demo_repo, live_stack):
    client = AirflowClient(live_stack["airflow"])
    client.wait_for_dag()
    commit_sha = demo_repo["commit_sha"]
    run = client.trigger_commit(commit_sha)
    assert run["dag_run_id"] == f"commit__{commit_sha}"
    finished = client.wait_for_run(run["dag_run_id"], timeout=600)
    states = {ti["task_id"]: ti["state"] for ti in client.task_instances(run["dag_run_id"])}
    assert finished["state"] == "success", states
    assert finished["conf"]["commit_sha"] == commit_sha and commit_sha in finished["note"]

    served = httpx.get(live_stack["serving"] + "/version").json()
    assert served["commit_sha"] == commit_sha and served["airflow_run_id"] == f"commit__{commit_sha}"
    tags = registry.version_tags(registry.find_version(settings, commit_sha))
    assert tags["airflow_run_id"] == f"commit__{commit_sha}"

    # Triggering the same commit again returns the existing run instead of starting a second one.
    assert client.trigger_commit(commit_sha)["dag_run_id"] == run["dag_run_id"]
    runs = client._check(client._http.get("/api/v2/dags/gitops_ml_pipeline/dagRuns"), "list runs")
    assert runs["total_entries"] == 1
    assert httpx.get(live_stack["mlflow"] + "/health").status_code == 200

    # The UI plugin: listed by the API, and its DAG-run link lands on this commit's MLflow run.
    plugins = client._check(client._http.get("/api/v2/plugins"), "list plugins")["plugins"]
    assert any(p["name"] == "gitops_ml" for p in plugins)
    link = client._http.get(f"/gitops-ml/runs/gitops_ml_pipeline/commit__{commit_sha}/mlflow")
    mlflow_run = registry.find_training_run(settings, f"commit__{commit_sha}")
    assert link.status_code == 307 and link.headers["location"].startswith(live_stack["mlflow"])
    assert link.headers["location"].endswith(f"/runs/{mlflow_run.info.run_id}")
