"""Airflow UI plugin of gitops-ml: the GitOps page (every commit, what it became, what serves now,
roll back), MLflow and served-model links in the navigation, on every DAG run a link to the
MLflow run that the commit's training produced, and task-level links (MLflow run on
``train``/``register``, the serving replicas' ``/version`` on ``deploy``).

The app it mounts under ``/gitops-ml`` (``gitops_ml.airflow.links``) sits behind the API
server's auth manager (an Airflow login, DAG-run read access to see, trigger access to roll
back); only its push webhook answers without a login, and it checks its own HMAC/token before
anything else.  Airflow 3.3's UI shows an external view only when it has a ``url_route``.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from gitops_ml.airflow import run_note
from gitops_ml.airflow.extra_links import MLflowRunLink, ServingVersionLink
from gitops_ml.airflow.links import create_app
from gitops_ml.config import Settings

_MLFLOW_UI = Settings.from_env().mlflow_ui_url


class GitopsMLPlugin(AirflowPlugin):
    name = "gitops_ml"
    listeners = [run_note]  # a pipeline run's note ends with its outcome
    fastapi_apps = [{"app": create_app(), "url_prefix": "/gitops-ml", "name": "gitops-ml links"}]
    global_operator_extra_links = [MLflowRunLink(), ServingVersionLink()]
    external_views = [
        {
            "name": "GitOps",
            "href": "/gitops-ml/ui",
            "destination": "nav",
            "url_route": "gitops",
            "nav_top_level": True,
            "icon": "/gitops-ml/static/gitops.svg",
        },
        {
            "name": "GitOps",
            "href": "/gitops-ml/ui?dag_id={DAG_ID}",
            "destination": "dag",
            "url_route": "gitops-dag",
            "icon": "/gitops-ml/static/gitops.svg",
        },
        {"name": "MLflow", "href": _MLFLOW_UI, "destination": "nav", "category": "gitops-ml"},
        {"name": "Served model", "href": "/gitops-ml/serving", "destination": "nav", "category": "gitops-ml"},
        # MLflow refuses to be framed (X-Frame-Options), so the run's tab is the GitOps row of its
        # commit, with the MLflow run, version and logs links.
        {
            "name": "GitOps of this commit",
            "href": "/gitops-ml/ui?run_id={RUN_ID}",
            "destination": "dag_run",
            "url_route": "gitops-run",
            "icon": "/gitops-ml/static/gitops.svg",
        },
    ]
