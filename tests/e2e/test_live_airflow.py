"""The whole path on a live Airflow (``airflow standalone``: scheduler, dag-processor, triggerer,
API server, LocalExecutor on SQLite), started by the test like ``make demo`` does."""

import httpx
import pytest

from gitops_ml import logs, registry, stack
from gitops_ml.airflow.client import AirflowClient
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def live_stack(settings, es):
    """``airflow standalone`` + MLflow + server; ``ES_URL`` is set, so task logs go to Elasticsearch
    and the Airflow UI reads finished tries back from it (``[logging] remote_logging``)."""
    ports = {"airflow_port": free_port(), "mlflow_port": free_port(),
             "serve_port": int(settings.serving_url.rsplit(":", 1)[1])}
    try:
        urls = stack.up(settings, **ports)
        yield urls
    finally:
        stack.down(settings)


def test_trigger_names_run_after_commit_and_serves_it(settings, demo_repo, live_stack, es):
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

    # The UI's task log view: read back from Elasticsearch by the provider (local copies removed first).
    airflow_logs = settings.home / "airflow" / "logs"
    removed = [p for p in airflow_logs.rglob("*.log") if f"commit__{commit_sha}" in str(p)]
    assert removed, "Airflow wrote no local task log files"
    for path in removed:
        path.unlink()
    response = client._http.get(f"/api/v2/dags/gitops_ml_pipeline/dagRuns/commit__{commit_sha}"
                                "/taskInstances/train/logs/1", params={"full_content": "true"},
                                headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    content = response.json()["content"]
    events = [line.get("event", "") for line in content if isinstance(line, dict)]
    assert any("Elasticsearch" in " ".join(line.get("sources", [])) for line in content if isinstance(line, dict)) \
        or any("gitops-ml-logs" in e for e in events), content[:3]
    shipped = logs.search(settings.home, commit_sha, task_id="train", client=es[0])
    assert [d["message"] for d in shipped] == [e for e in events if e in {d["message"] for d in shipped}]
    assert any(e.startswith("epoch 12:") for e in events)
    assert all(isinstance(e, str) and not e.startswith("{'dataset'") for e in events)
