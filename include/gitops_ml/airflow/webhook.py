"""Push webhooks (GitHub, GitLab, Gitea) served by the Airflow API server (plugin app).

``POST /gitops-ml/webhooks/<watch name>``: the signature (HMAC) or token is checked against
the watched repository's secret before the body is even parsed (401 otherwise, nothing
started); a malformed payload gets 400.  A push to the watched branch is planned like the
poller does (burst policy, path filter, signatures) and its runs are created at once, in
this process, with the same ``commit__<sha>`` ids, so the poller later finds them done.

Why in the API server: no extra service, port or credentials (the webhook creates runs
through Airflow's own ``trigger_dag`` in-process, not through the REST API with a token),
and it is reachable wherever the UI is.  It is the only gitops-ml endpoint that accepts
unauthenticated requests, and it trusts nothing but the signature.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def create_pipeline_run(request: dict[str, Any]) -> bool:
    """Create one pipeline run from a run request (see ``watch_steps.run_requests``); False if it exists."""
    from airflow.api.common.trigger_dag import trigger_dag  # noqa: PLC0415

    from gitops_ml.airflow.steps import PIPELINE_DAG_ID  # noqa: PLC0415
    from airflow.exceptions import DagRunAlreadyExists  # noqa: PLC0415
    from airflow.utils.types import DagRunTriggeredByType, DagRunType  # noqa: PLC0415
    from sqlalchemy.exc import IntegrityError  # noqa: PLC0415

    try:
        trigger_dag(PIPELINE_DAG_ID, triggered_by=DagRunTriggeredByType.REST_API, run_type=DagRunType.MANUAL,
                    triggering_user_name="gitops-ml webhook", run_id=request["trigger_run_id"],
                    conf=request["conf"], note=request["note"])
    except (DagRunAlreadyExists, IntegrityError):
        return False
    return True


def handle_push(watch_name: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for one webhook delivery."""
    from gitops_ml import watch, webhooks  # noqa: PLC0415
    from gitops_ml.airflow import watch_steps  # noqa: PLC0415
    from gitops_ml.errors import GitopsMLError, InputError  # noqa: PLC0415

    try:
        watched = watch.get_watch(watch_name)
    except InputError:
        return 404, {"error": f"no watched repository named {watch_name!r}"}
    secret = watched.webhook_secret()
    if not secret:
        return 401, {"error": f"no webhook secret configured for {watch_name!r} "
                              f"(set {watched.webhook_secret_env or 'GITOPS_ML_WEBHOOK_SECRET'})"}
    try:
        event = webhooks.parse_push(headers, body, secret)
    except webhooks.WebhookError as exc:
        return exc.status_code, {"error": str(exc)}
    if event is None:
        return 202, {"ignored": "not a branch push event"}
    if event.branch != watched.branch:
        return 202, {"ignored": f"push to branch {event.branch!r}; {watch_name!r} watches {watched.branch!r}"}
    if event.after_sha is None:
        return 202, {"ignored": f"branch {event.branch!r} was deleted"}
    settings = watch_steps.settings_for(watched)
    try:
        plan = watch.plan_branch(watched, settings.git_cache_dir, event.before_sha, event.after_sha).to_dict()
    except InputError as exc:
        return 400, {"error": str(exc)}
    except GitopsMLError as exc:  # e.g. the remote is unreachable right now: the sender retries
        return 503, {"error": str(exc)}
    run_id = f"webhook__{event.after_sha}"
    watch_steps.record_plan(settings, plan, run_id)
    created, existing = [], []
    for request in watch_steps.run_requests(watched.name, watched.branch, plan, trigger="webhook"):
        (created if create_pipeline_run(request) else existing).append(request["trigger_run_id"])
    log.info("webhook %s for %s: created %s, already there %s", event.provider, event.after_sha, created, existing)
    return 202, {"provider": event.provider, "head_sha": event.after_sha, "created": created, "existing": existing,
                 "decisions": [{k: d[k] for k in ("commit_sha", "action", "reason")} for d in plan["decisions"]],
                 "force_push": plan["force_push"]}
