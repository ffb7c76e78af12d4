"""The Airflow UI links app against a real MLflow store."""

import mlflow
from starlette.testclient import TestClient

from gitops_ml import registry
from gitops_ml.airflow.links import create_app


def test_dag_run_link_redirects_to_its_mlflow_run(settings, monkeypatch):
    monkeypatch.setenv("GITOPS_ML_MLFLOW_UI_URL", "http://127.0.0.1:5999")
    exp = registry.experiment_id(settings)
    with mlflow.start_run(experiment_id=exp, tags={"gitops_ml.airflow_run_id": "commit__abc"}) as run:
        pass
    client = TestClient(create_app())
    found = client.get("/runs/gitops_ml_pipeline/commit__abc/mlflow", follow_redirects=False)
    assert found.status_code == 307
    assert found.headers["location"] == f"http://127.0.0.1:5999/#/experiments/{exp}/runs/{run.info.run_id}"
    missing = client.get("/runs/gitops_ml_pipeline/commit__<script>/mlflow", follow_redirects=False)
    assert missing.status_code == 404 and "<script>" not in missing.text
    assert client.get("/serving", follow_redirects=False).headers["location"] == settings.serving_url + "/version"
