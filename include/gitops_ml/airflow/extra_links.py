"""Task-level links of the pipeline in the Airflow UI (a task instance's "Extra links").

- ``train`` and ``register``: the MLflow run of the commit (``/gitops-ml/runs/.../mlflow``
  redirects to it once the run exists);
- ``deploy``: the serving replica's ``/version`` (``/gitops-ml/serving``).

Global links, resolved by the API server; any other task (or DAG) gets no link.  The targets
are the plugin's own endpoints, so they stay behind Airflow's login.
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

from gitops_ml.runs import PIPELINE_DAG_ID


class MLflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != PIPELINE_DAG_ID or operator.task_id not in ("train", "register"):
            return ""
        return f"/gitops-ml/runs/{quote(ti_key.dag_id, safe='')}/{quote(ti_key.run_id, safe='')}/mlflow"


class ServingVersionLink(BaseOperatorLink):
    name = "Served /version"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != PIPELINE_DAG_ID or operator.task_id != "deploy":
            return ""
        return "/gitops-ml/serving"
