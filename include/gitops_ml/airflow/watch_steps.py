"""Task bodies of the watcher and retraining DAGs: translation only, over ``gitops_ml.flow`` and ``gitops_ml.runs``.

The plans (``flow.plan_runs``), the run requests and their names (``gitops_ml.runs``) are shared with the
push webhook; here the watch name and the sensor's result come in, run requests for
``TriggerDagRunOperator`` go out, and the watcher's cursor is an Airflow Variable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def plan_commits(watch_name: str, found: dict[str, Any] | None, run_id: str) -> list[dict[str, Any]]:
    """Watcher task: from the sensor's result to the pipeline runs to start."""
    from gitops_ml import flow, watch

    if not found:
        return []
    watched = watch.get_watch(watch_name)
    _, requests = flow.plan_runs(
        watched, watched.run_settings(), found.get("previous_sha"), found["head_sha"], run_id, trigger="push"
    )
    return requests


def advance_cursor(watch_name: str, found: dict[str, Any] | None) -> str | None:
    """Remember the head the watcher has handled (an Airflow Variable, visible in the UI)."""
    from airflow.sdk import Variable

    from gitops_ml import watch

    if not found:
        return None
    Variable.set(
        watch.get_watch(watch_name).cursor_key,
        found["head_sha"],
        description=f"last commit planned by the gitops-ml watcher of {watch_name!r}",
    )
    return found["head_sha"]


def plan_retrain(watch_name: str, when: datetime) -> list[dict[str, Any]]:
    """Retraining DAG task: one pipeline run for the head of the branch, named by SHA + schedule time."""
    from gitops_ml import flow, watch

    return flow.plan_retrain(watch.get_watch(watch_name), when)
