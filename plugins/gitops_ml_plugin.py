"""Airflow UI plugin of gitops-ml: MLflow and served-model links in the navigation, and on
every DAG run a link to the MLflow run that the commit's training produced.

The app it mounts under ``/gitops-ml`` (``gitops_ml.airflow.links``) sits behind the API
server's auth manager (an Airflow login, DAG-run read access for the MLflow link); only its
push webhook answers without a login, and it checks its own HMAC/token before anything else."""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

from gitops_ml.airflow import run_note
from gitops_ml.airflow.links import create_app

_MLFLOW_UI = os.environ.get("GITOPS_ML_MLFLOW_UI_URL", "http://127.0.0.1:5000")


class GitopsMLPlugin(AirflowPlugin):
    name = "gitops_ml"
    listeners = [run_note]  # a pipeline run's note ends with its outcome
    fastapi_apps = [{"app": create_app(), "url_prefix": "/gitops-ml", "name": "gitops-ml links"}]
    external_views = [
        {"name": "MLflow", "href": _MLFLOW_UI, "destination": "nav", "category": "gitops-ml"},
        {"name": "Served model", "href": "/gitops-ml/serving", "destination": "nav", "category": "gitops-ml"},
        {"name": "MLflow run of this commit", "href": "/gitops-ml/runs/{DAG_ID}/{RUN_ID}/mlflow",
         "destination": "dag_run"},
    ]
