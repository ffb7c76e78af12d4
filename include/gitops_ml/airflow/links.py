"""Links from the Airflow UI to what a run produced (its MLflow run, the served model), and the
push webhook endpoint (``gitops_ml.airflow.webhook``).

A small FastAPI app mounted in the Airflow API server by ``plugins/gitops_ml_plugin.py``.
It only reads (MLflow lookups, one redirect); MLflow is imported on the first request,
never when the API server loads plugins.
"""

from __future__ import annotations

import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from gitops_ml.config import Settings


def create_app() -> FastAPI:
    app = FastAPI(title="gitops-ml links", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/runs/{dag_id}/{run_id}/mlflow")
    def mlflow_run(dag_id: str, run_id: str):
        from gitops_ml import registry  # noqa: PLC0415

        settings = Settings.from_env()
        found = registry.find_training_run(settings, run_id)
        if found is None:
            return HTMLResponse(
                f"<p>No MLflow training run for Airflow run <code>{html.escape(run_id)}</code> of "
                f"<code>{html.escape(dag_id)}</code> (not trained yet, or the commit reused an existing "
                f"model version).</p><p><a href='{html.escape(settings.mlflow_ui_url)}'>Open MLflow</a></p>",
                status_code=404)
        return RedirectResponse(registry.run_url(settings.mlflow_ui_url, found.info.experiment_id,
                                                 found.info.run_id))

    @app.post("/webhooks/{watch_name}")
    async def push_webhook(watch_name: str, request: Request):
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        from gitops_ml.airflow.webhook import handle_push  # noqa: PLC0415

        body = await request.body()
        status, payload = await run_in_threadpool(handle_push, watch_name, dict(request.headers), body)
        return JSONResponse(payload, status_code=status)

    @app.get("/serving")
    def serving():
        return RedirectResponse(Settings.from_env().serving_url + "/version")

    return app
