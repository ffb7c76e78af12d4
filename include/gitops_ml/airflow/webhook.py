"""Push webhooks (GitHub, GitLab, Gitea) served by the Airflow API server (plugin app).

``POST /gitops-ml/webhooks/<watch name>``, in this order, each step before any later work:

1. the headers alone: an unknown watch (404), no secret configured, no signature or token
   header, a wrong GitLab token (401), a declared ``Content-Length`` over the limit (413);
2. the body, streamed and cut off at ``webhooks.MAX_BODY_BYTES`` (413: nothing more is read);
3. the HMAC signature of the body (401), then the JSON payload (400);
4. the delivery id (``X-GitHub-Delivery``, ``X-Gitea-Delivery``, ``X-Gitlab-Event-UUID``): a
   delivery already handled gets 200 "duplicate delivery" and starts nothing;
5. the pushed SHA, after fetching the branch: it must be the branch head as the remote tells it
   now, or a commit on that branch (422 when the remote does not have it, 409 when it is not on
   the branch: nothing started);
6. the push is planned like the poller does (burst policy, path filter, signatures) and its runs
   are created at once, in this process, with the same ``commit__<sha>`` ids, so the poller later
   finds them done.

Delivery ids are kept in the Airflow DB, one Variable per delivery
(``gitops_ml_webhook_delivery__<provider>__<id>``), created with an INSERT that the unique key
of the variable table makes atomic: two API servers, or a restarted one, agree on which
delivery came first.  A delivery that was not handled (a 4xx/5xx answer) releases its id, so the
forge's redelivery is handled; ids older than ``DELIVERY_RETENTION`` are pruned.

Why in the API server: no extra service, port or credentials (the webhook creates runs
through Airflow's own ``trigger_dag`` in-process, not through the REST API with a token),
and it is reachable wherever the UI is.  It is the only gitops-ml endpoint that accepts
unauthenticated requests, and it trusts nothing but the signature.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

DELIVERY_PREFIX = "gitops_ml_webhook_delivery__"
DELIVERY_RETENTION = timedelta(days=7)  # forges redeliver within days (GitHub keeps 3 days of deliveries)
_PRUNE_EVERY = 600.0
_last_prune = 0.0


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, streamed; ``WebhookTooLarge`` as soon as it exceeds ``limit`` bytes."""
    from gitops_ml import webhooks

    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise webhooks.too_large()
    return bytes(body)


def _delivery_key(provider: str, delivery_id: str) -> str:
    return f"{DELIVERY_PREFIX}{provider}__{delivery_id}"


def claim_delivery(provider: str, delivery_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """Record a delivery as handled; ``None`` when it is new, else what the first one recorded.

    Atomic across processes: the INSERT of the Variable fails on its unique key when another
    request (here, in another API server, or before a restart) has claimed the id already.
    """
    from airflow.models import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    key = _delivery_key(provider, delivery_id)
    value = {**record, "received_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        with create_session() as session:
            session.add(
                Variable(
                    key=key,
                    val=json.dumps(value),
                    description=(
                        "gitops-ml push webhook delivery already handled (redeliveries are answered 'duplicate "
                        f"delivery'); pruned after {DELIVERY_RETENTION.days} days"
                    ),
                )
            )
            session.flush()
    except IntegrityError:
        with create_session() as session:
            found = session.scalar(select(Variable).where(Variable.key == key))
            try:
                return json.loads(found.val) if found is not None else {"received_at": None}
            except ValueError:
                return {"received_at": None}
    _prune_deliveries()
    return None


def release_delivery(provider: str, delivery_id: str) -> None:
    """Forget a claimed delivery that was not handled, so its redelivery is."""
    from airflow.models import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(Variable).where(Variable.key == _delivery_key(provider, delivery_id)))


def _prune_deliveries() -> None:
    """Delete delivery ids older than ``DELIVERY_RETENTION`` (at most every 10 minutes per process)."""
    global _last_prune  # noqa: PLW0603 - a per-process throttle
    if time.monotonic() - _last_prune < _PRUNE_EVERY:
        return
    _last_prune = time.monotonic()
    from airflow.models import Variable
    from airflow.utils.session import create_session
    from sqlalchemy import select

    cutoff = datetime.now(UTC) - DELIVERY_RETENTION
    with create_session() as session:
        for variable in session.scalars(select(Variable).where(Variable.key.startswith(DELIVERY_PREFIX))):
            try:
                received = datetime.fromisoformat(json.loads(variable.val)["received_at"])
            except (ValueError, KeyError, TypeError):
                continue
            if received < cutoff:
                session.delete(variable)


def create_pipeline_run(request: dict[str, Any]) -> bool:
    """Create one pipeline run from a run request (see ``runs.run_requests``); False if it exists."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagRunAlreadyExists
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from sqlalchemy.exc import IntegrityError

    from gitops_ml import runs

    try:
        trigger_dag(
            runs.PIPELINE_DAG_ID,
            triggered_by=DagRunTriggeredByType.REST_API,
            run_type=DagRunType.MANUAL,
            triggering_user_name="gitops-ml webhook",
            run_id=request["trigger_run_id"],
            conf=request["conf"],
            note=request["note"],
        )
    except (DagRunAlreadyExists, IntegrityError):
        return False
    return True


def check_headers(watch_name: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
    """(HTTP status, JSON body) when the request can be refused before reading its body, else None."""
    from gitops_ml import watch, webhooks
    from gitops_ml.errors import InputError

    try:
        watched = watch.get_watch(watch_name)
    except InputError:
        return 404, {"error": f"no watched repository named {watch_name!r}"}
    secret = watched.webhook_secret()
    if not secret:
        return 401, {
            "error": f"no webhook secret configured for {watch_name!r} "
            f"(set {watched.webhook_secret_env or 'GITOPS_ML_WEBHOOK_SECRET'})"
        }
    try:
        webhooks.check_headers(headers, secret)
    except webhooks.WebhookError as exc:
        return exc.status_code, {"error": str(exc)}
    return None


def verify_on_branch(watched, cache_dir, commit_sha: str) -> tuple[int, dict[str, Any]] | None:
    """Fetch the watched branch; (status, error) unless ``commit_sha`` is its head or on it."""
    from gitops_ml import source

    history = source.history(watched.url, watched.branch, cache_dir)
    head = history.head(watched.branch)
    where = {"commit_sha": commit_sha, "branch": watched.branch, "branch_head": head}
    if commit_sha == head:
        return None
    if not history.exists(commit_sha):
        return 422, {
            "error": f"commit {commit_sha} does not exist in {watched.safe_url} (branch "
            f"{watched.branch!r} fetched just now, head {head}); no run started",
            **where,
        }
    if not history.is_ancestor(commit_sha, head):
        return 409, {
            "error": f"commit {commit_sha} is not on branch {watched.branch!r} of {watched.safe_url} "
            f"(head {head}); no run started",
            **where,
        }
    return None


def handle_push(watch_name: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for one webhook delivery (the body already read within the limit)."""
    from gitops_ml import watch, webhooks

    refused = check_headers(watch_name, headers)
    if refused:
        return refused
    watched = watch.get_watch(watch_name)
    try:
        event = webhooks.parse_push(headers, body, watched.webhook_secret())
    except webhooks.WebhookError as exc:
        return exc.status_code, {"error": str(exc)}
    if event is None:
        return 202, {"ignored": "not a branch push event"}
    if event.branch != watched.branch:
        return 202, {"ignored": f"push to branch {event.branch!r}; {watch_name!r} watches {watched.branch!r}"}
    if event.after_sha is None:
        return 202, {"ignored": f"branch {event.branch!r} was deleted"}
    if event.delivery_id:
        first = claim_delivery(event.provider, event.delivery_id, {"watch": watch_name, "head_sha": event.after_sha})
        if first is not None:
            log.info(
                "webhook %s delivery %s for %s: duplicate of the delivery received at %s",
                event.provider,
                event.delivery_id,
                event.after_sha,
                first.get("received_at"),
            )
            return 200, {
                "ignored": "duplicate delivery",
                "delivery_id": event.delivery_id,
                "first_received_at": first.get("received_at"),
                "head_sha": first.get("head_sha"),
            }
    status, payload = _start_runs(watched, event)
    if event.delivery_id and status >= 300:
        release_delivery(event.provider, event.delivery_id)
    return status, payload


def _start_runs(watched, event) -> tuple[int, dict[str, Any]]:
    from gitops_ml import flow
    from gitops_ml.errors import GitopsMLError, InputError

    settings = watched.run_settings()
    try:
        refused = verify_on_branch(watched, settings.git_cache_dir, event.after_sha)
        if refused:
            log.warning("webhook %s: %s", event.provider, refused[1]["error"])
            return refused
        plan, requests = flow.plan_runs(
            watched, settings, event.previous_sha, event.after_sha, f"webhook__{event.after_sha}", trigger="webhook"
        )
    except InputError as exc:
        return 400, {"error": str(exc)}
    except GitopsMLError as exc:  # e.g. the remote is unreachable right now: the sender retries
        return 503, {"error": str(exc)}
    created: list[str] = []
    existing: list[str] = []
    for request in requests:
        (created if create_pipeline_run(request) else existing).append(request["trigger_run_id"])
    log.info("webhook %s for %s: created %s, already there %s", event.provider, event.after_sha, created, existing)
    return 202, {
        "provider": event.provider,
        "head_sha": event.after_sha,
        "created": created,
        "existing": existing,
        "delivery_id": event.delivery_id,
        "decisions": [{k: d[k] for k in ("commit_sha", "action", "reason")} for d in plan["decisions"]],
        "force_push": plan["force_push"],
    }
