"""Links from the Airflow UI to what a run produced (its MLflow run, the served model), and the
push webhook endpoint (``gitops_ml.airflow.webhook``).

A small FastAPI app mounted in the Airflow API server by ``plugins/gitops_ml_plugin.py``.
It only reads (MLflow lookups, one redirect); MLflow is never imported when a process loads
plugins: the API server imports it in the background once it has started (the app's lifespan,
``gitops_view.warm_up_in_background``), else the first request does.

Authentication: the links sit behind Airflow's own auth manager, like the REST API: the
caller must be an Airflow user (a JWT as ``Authorization: Bearer`` or the UI's session
cookie, resolved by ``airflow.api_fastapi.core_api.security.get_user``; 401 without one, 403
for a bad token), and the MLflow-run link also needs read access to the DAG's runs
(``requires_access_dag("GET", DagAccessEntity.RUN)``).  Airflow's security module is imported
on the first request only, so workers that load plugins do not pay for it.  The webhook is
the one endpoint without an Airflow login: forges cannot log in, and it trusts nothing but
its own signature (HMAC or token) of the watched repository.
"""

from __future__ import annotations

import html

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gitops_ml.config import Settings

_bearer = HTTPBearer(auto_error=False)


async def airflow_user(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)):
    """The Airflow user of the request (Airflow's ``get_user``: bearer token, else session cookie)."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, bearer)


def create_app() -> FastAPI:
    from gitops_ml.airflow import gitops_view

    app = FastAPI(
        title="gitops-ml links",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=gitops_view.warm_up_in_background,  # the API server enters it at start; nobody else does
    )

    @app.get("/runs/{dag_id}/{run_id}/mlflow")
    def mlflow_run(dag_id: str, run_id: str, request: Request, user=Depends(airflow_user)):
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
        from airflow.api_fastapi.core_api.security import requires_access_dag

        from gitops_ml import registry
        from gitops_ml.errors import InputError

        requires_access_dag("GET", DagAccessEntity.RUN)(request, user)  # 403 unless the user may read its runs
        settings = Settings.from_env()
        try:
            found = registry.find_training_run(settings, run_id)
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if found is None:
            return HTMLResponse(
                f"<p>No MLflow training run for Airflow run <code>{html.escape(run_id)}</code> of "
                f"<code>{html.escape(dag_id)}</code> (not trained yet, or the commit reused an existing "
                f"model version).</p><p><a href='{html.escape(settings.mlflow_ui_url)}'>Open MLflow</a></p>",
                status_code=404,
            )
        return RedirectResponse(registry.run_url(settings.mlflow_ui_url, found.experiment_id, found.run_id))

    @app.post("/webhooks/{watch_name}")
    async def push_webhook(watch_name: str, request: Request):
        """No Airflow login (forges cannot log in): headers checked, then the body streamed up to the limit."""
        from starlette.concurrency import run_in_threadpool

        from gitops_ml import webhooks
        from gitops_ml.airflow import webhook

        headers = dict(request.headers)
        refused = await run_in_threadpool(webhook.check_headers, watch_name, headers)
        if refused:
            return JSONResponse(refused[1], status_code=refused[0])
        try:
            body = await webhook.read_body(request, webhooks.MAX_BODY_BYTES)
        except webhooks.WebhookError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status_code, headers={"Connection": "close"})
        status, payload = await run_in_threadpool(webhook.handle_push, watch_name, headers, body)
        return JSONResponse(payload, status_code=status)

    @app.get("/serving")
    def serving(user=Depends(airflow_user)):
        return RedirectResponse(Settings.from_env().serving_url + "/version")

    gitops_view.add_routes(app, airflow_user)  # the GitOps page, its JSON and the roll-back action
    return app
