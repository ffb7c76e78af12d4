"""The GitOps page of the Airflow UI: an external view (``/gitops-ml/ui``) the UI shows in its own
frame, and the JSON it polls (``/gitops-ml/api/history``), served by the plugin's FastAPI app
inside the API server; and the roll-back/promote action (``POST /gitops-ml/api/deploy``).

Why an external view and not a React app: the page is server-side data (the Airflow DB, MLflow,
the replicas, Git, the run records) rendered as a table that polls; a React app would need a
JavaScript toolchain and a bundle to build and ship for what a small HTML page and one script do.
The frame is same-origin, so the browser sends the UI's session cookie with every request
and Airflow's auth manager decides (``get_user`` + ``requires_access_dag``); the page follows the
UI's light/dark theme by reading the parent document's color mode.

This module only translates: for each watched repository it reads one page of its pipeline runs
from the metadata DB (read-only: one query for the runs, one for their task instances, one for
their XComs) and hands them to ``gitops_ml.history`` (the section: Now serving and the rows) and
``gitops_ml.rollback`` (the action, with the watch's model and servers). The API server imports
MLflow in the background when it starts (``warm_up_in_background``), not on the first request.
"""

import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gitops_ml.airflow.run_note import OUTCOME_KEY
from gitops_ml.errors import InputError
from gitops_ml.history import TASK_ORDER
from gitops_ml.runs import DEFAULT_WATCH, PIPELINE_DAG_ID
from gitops_ml.watch import NAME_PATTERN

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "gitops.html"
ICON = PAGE.with_name("gitops.svg")
MAX_PER_PAGE = 100
WATCH_PAGE = re.compile(NAME_PATTERN.rstrip("$") + r":[0-9]{1,6}$")
MAX_WATCH_PAGES = 100
XCOM_TASKS = ("resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy")


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def pipeline_runs(
    session,
    offset: int,
    limit: int,
    dag_id: str = PIPELINE_DAG_ID,
    run_id: str | None = None,
    watch: str | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """One page of the pipeline's runs (or the one run ``run_id``), newest first, with their task
    states and XComs (four queries, none of them per run); with ``watch`` only the runs of that
    watched repository (the run conf's ``watch``; a run without one belongs to ``default``)."""
    from airflow.models.dagrun import DagRun, DagRunNote
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from sqlalchemy import func, or_, select

    where = [DagRun.dag_id == dag_id] + ([DagRun.run_id == run_id] if run_id is not None else [])
    if watch is not None:
        of_watch = DagRun.conf["watch"].as_string()
        where.append(or_(of_watch == watch, of_watch.is_(None)) if watch == DEFAULT_WATCH else of_watch == watch)
    total = session.scalar(select(func.count()).select_from(DagRun).where(*where)) or 0
    rows = session.execute(
        select(
            DagRun.run_id,
            DagRun.state,
            DagRun.conf,
            DagRun.start_date,
            DagRun.end_date,
            DagRun.run_after,
            DagRunNote.content,
        )
        .outerjoin(DagRunNote, DagRunNote.dag_run_id == DagRun.id)
        .where(*where)
        .order_by(DagRun.run_after.desc(), DagRun.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    runs = {
        r.run_id: {
            "dag_id": dag_id,
            "run_id": r.run_id,
            "state": str(r.state) if r.state else None,
            "conf": r.conf or {},
            "start_date": _iso(r.start_date),
            "end_date": _iso(r.end_date),
            "run_after": _iso(r.run_after),
            "note": r.content,
            "tasks": {},
            "xcom": {},
        }
        for r in rows
    }
    if runs:
        for ti in session.execute(
            select(
                TaskInstance.run_id,
                TaskInstance.task_id,
                TaskInstance.state,
                TaskInstance.start_date,
                TaskInstance.end_date,
                TaskInstance.try_number,
            ).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id.in_(list(runs)), TaskInstance.task_id.in_(TASK_ORDER)
            )
        ).all():
            runs[ti.run_id]["tasks"][ti.task_id] = {
                "state": str(ti.state) if ti.state else None,
                "start_date": _iso(ti.start_date),
                "end_date": _iso(ti.end_date),
                "try_number": ti.try_number,
            }
        for x in session.execute(
            select(XComModel.run_id, XComModel.task_id, XComModel.key, XComModel.value, XComModel.timestamp)
            .where(
                XComModel.dag_id == dag_id,
                XComModel.run_id.in_(list(runs)),
                XComModel.key.in_(("return_value", OUTCOME_KEY)),
            )
            .order_by(XComModel.timestamp)
        ).all():
            value = XComModel.deserialize_value(x)
            if x.key == OUTCOME_KEY:
                runs[x.run_id]["xcom"]["outcome"] = str(value)
            elif x.task_id in XCOM_TASKS and isinstance(value, dict):
                runs[x.run_id]["xcom"][x.task_id] = value
    return total, list(runs.values())


def may_trigger(request, user) -> bool:
    """Whether Airflow's auth manager lets ``user`` trigger runs of the pipeline (the roll-back right)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return bool(
        get_auth_manager().is_authorized_dag(
            method="POST", access_entity=DagAccessEntity.RUN, details=DagDetails(id=PIPELINE_DAG_ID), user=user
        )
    )


def require(request, user, method: Literal["GET", "POST"]) -> None:
    """403 unless ``user`` may read (``GET``) or trigger (``POST``) the pipeline's runs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    requires_access_dag(method, DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID)(request, user)


def history_page(
    page: int,
    per_page: int,
    run_id: str | None = None,
    watch: str | None = None,
    watch_pages: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The history JSON: one section per watched repository (or the one ``watch``), each its own page
    of runs (``watch_pages[name]``, else ``page``) from the metadata DB (a read-only session) beside
    what the other stores know; with ``run_id`` only the section holding that run."""
    from airflow.utils.session import create_session

    from gitops_ml import history

    per_page = max(1, min(MAX_PER_PAGE, per_page))
    kibana_url = os.environ.get("GITOPS_ML_KIBANA_URL") or None
    sections = []
    with create_session() as session:
        for name, settings in history.watched(watch):
            number = max(1, (watch_pages or {}).get(name, page))
            total, runs = pipeline_runs(session, (number - 1) * per_page, per_page, run_id=run_id, watch=name)
            session.rollback()  # read only: nothing of ours is ever written to the metadata DB
            if run_id is None or runs:
                sections.append(history.collect_section(settings, name, runs, total, number, per_page, kibana_url))
    return {"sections": sections, "running": any(s["running"] for s in sections)}


@asynccontextmanager
async def warm_up_in_background(app) -> AsyncIterator[None]:
    """Lifespan of the plugin's app: start ``history.warm_up`` in a daemon thread and yield at once.

    Importing MLflow takes seconds (about 10 s on a loaded 2-core machine), which the first history
    request would otherwise pay; the API server does not wait for it (a request that comes sooner
    waits only for the rest of the import). Only the API server enters the lifespan of a plugin's
    app, so the scheduler, workers and triggerer that load the plugin import no MLflow."""
    threading.Thread(target=_warm_up, name="gitops-ml-warm-up", daemon=True).start()
    yield


def _warm_up() -> None:
    started = time.monotonic()
    try:
        from gitops_ml import history

        history.warm_up()
    except Exception as exc:  # noqa: BLE001 - the first request will say what is wrong
        log.warning("GitOps page warm-up failed (the first request pays for it): %s", exc)
    else:
        log.info("GitOps page warmed up in %.1f s", time.monotonic() - started)


def user_name(user) -> str:
    for getter in ("get_name", "get_id"):
        try:
            value = getattr(user, getter)()
        except Exception:  # noqa: BLE001 - an auth manager's user may not implement both
            continue
        if value:
            return str(value)
    return "unknown user"


def add_routes(app, airflow_user) -> None:
    """The page, its JSON and the deploy action on the plugin's FastAPI ``app`` (behind ``airflow_user``)."""
    User = Annotated[Any, Depends(airflow_user)]  # a type alias, local to the app

    @app.get("/static/gitops.svg")
    def gitops_icon():
        return Response(ICON.read_bytes(), media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/ui", response_class=HTMLResponse)
    def gitops_page(request: Request, user: User):
        require(request, user, "GET")
        return HTMLResponse(
            PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        )

    @app.get("/api/history")
    async def gitops_history(
        request: Request,
        user: User,
        page: int = Query(1, ge=1),
        per_page: int = Query(25, ge=1, le=MAX_PER_PAGE),
        run_id: str | None = Query(None, max_length=250, pattern=r"^[A-Za-z0-9_.~:+-]+$"),
        watch: str | None = Query(None, pattern=NAME_PATTERN),
        watch_page: list[str] = Query([], max_length=MAX_WATCH_PAGES),
    ):
        """``watch_page=NAME:N`` (repeatable) shows page N of that section, ``page`` is the others' page."""
        require(request, user, "GET")
        watch_pages = {}
        for value in watch_page:
            if not WATCH_PAGE.fullmatch(value):
                return JSONResponse({"error": f"watch_page must be NAME:PAGE, got {value[:60]!r}"}, status_code=422)
            name, number = value.rsplit(":", 1)
            watch_pages[name] = int(number)
        try:
            body = await run_in_threadpool(history_page, page, per_page, run_id, watch, watch_pages)
        except InputError as exc:  # an unknown watch, a bad watch file: the message names it
            return JSONResponse({"error": str(exc)}, status_code=400)
        body["user"] = {"name": user_name(user), "may_deploy": may_trigger(request, user)}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.post("/api/deploy")
    async def gitops_deploy(request: Request, user: User):
        """Roll back to (or promote) a registered version: JSON ``{"model_version": "3", "reason": "..."}``.

        The JSON body is required: a cross-site form cannot send it without a CORS preflight, which
        this app never allows, so the session cookie alone cannot be used to roll back."""
        require(request, user, "POST")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send the request as application/json"}, status_code=415)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        from gitops_ml import history, rollback
        from gitops_ml.errors import GitopsMLError

        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object with model_version"}, status_code=400)
        watch = body.get("watch", DEFAULT_WATCH)
        if not isinstance(watch, str) or not re.fullmatch(NAME_PATTERN, watch):
            return JSONResponse(
                {"error": f"watch must be a watched repository's name, got {str(watch)[:60]!r}"}, status_code=400
            )
        try:
            [(_, settings)] = history.watched(watch)
            result = await run_in_threadpool(
                rollback.deploy_version,
                settings,
                body.get("model_version"),
                user_name(user),
                body.get("reason"),
            )
        except GitopsMLError as exc:
            status = 400 if isinstance(exc, (rollback.RollbackRefused, InputError)) else 502
            return JSONResponse({"error": str(exc)}, status_code=status)
        return JSONResponse(result)
