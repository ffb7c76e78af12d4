"""Names and plans of pipeline runs: which runs a push or a schedule asks for, and what they are called.

One pipeline run per commit is guaranteed by the run id, ``commit__<sha>`` (``commit__<sha>__<watch>``
for a watched repository not named ``default``): Airflow refuses a second run with the same id,
whoever asks (watcher, webhook, a restarted scheduler, the CLI), and
``TriggerDagRunOperator(skip_when_already_exists=True)`` turns that refusal into "skipped".

Nothing here imports Airflow, a backend or another gitops-ml module at import time: the DAG files,
the webhook, the CLI and the REST client all take their names from this module.  Planning the
commits of a push and recording what gets no run is ``flow.plan_runs``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

__all__ = [
    "DEFAULT_WATCH",
    "PIPELINE_DAG_ID",
    "RUN_ID_PREFIX",
    "retrain_dag_id",
    "retrain_request",
    "retrain_run_id",
    "run_id_for",
    "run_note",
    "run_requests",
    "watch_dag_id",
]

log = logging.getLogger(__name__)

PIPELINE_DAG_ID = "gitops_ml_pipeline"
RUN_ID_PREFIX = "commit__"
DEFAULT_WATCH = "default"
"""The watch of ``GITOPS_ML_REPO_URL`` when there is no watch file; its runs carry no ``__<watch>`` suffix."""


def _watch_suffix(watch: str | None) -> str:
    return f"__{watch}" if watch and watch != DEFAULT_WATCH else ""


def run_id_for(commit_sha: str, suffix: str | None = None, watch: str | None = None) -> str:
    """Run id of the pipeline run for a commit: ``commit__<full sha>``, for a repository watched
    under another name than ``default`` ``commit__<sha>__<watch>`` (one run per SHA and watched
    branch: the same SHA on two watched branches or forks gets a run for each), plus a suffix
    for re-runs."""
    return f"{RUN_ID_PREFIX}{commit_sha}{_watch_suffix(watch)}" + (f"__{suffix}" if suffix else "")


def retrain_run_id(commit_sha: str, when: datetime, watch: str | None = None) -> str:
    """Run id of a scheduled retraining: ``retrain__<sha>__<schedule time>[__<watch>]``."""
    return f"retrain__{commit_sha}__{when.strftime('%Y%m%dT%H%M%SZ')}{_watch_suffix(watch)}"


def watch_dag_id(watch_name: str) -> str:
    """The watcher DAG of a watched repository."""
    return f"gitops_ml_watch__{watch_name}"


def retrain_dag_id(watch_name: str) -> str:
    """The scheduled retraining DAG of a watched repository."""
    return f"gitops_ml_retrain__{watch_name}"


def run_note(decision: dict[str, Any], trigger: str) -> str:
    """The note a planned run starts with (the first thing the Airflow UI shows of it): why it exists."""
    sha = decision["commit_sha"]
    head = {
        "train": f"{trigger}: build commit {sha}",
        "no_retrain": f"NO RETRAIN NEEDED for commit {sha}",
        "rejected": f"REJECTED commit {sha}",
    }[decision["action"]]
    note = f"{head}: {decision['reason']}"
    if decision.get("warning"):
        note += f"\n\nWARNING (signature policy warn): {decision['warning']}"
    return note


def _conf(decision: dict[str, Any], watch_name: str, branch: str, trigger: str) -> dict[str, Any]:
    conf = {
        "commit_sha": decision["commit_sha"],
        "watch": watch_name,
        "branch": branch,
        "trigger": trigger,
        "decision": decision["action"],
        "reason": decision["reason"],
    }
    if decision.get("warning"):
        conf["signature_warning"] = decision["warning"]
    return conf


def run_requests(watch_name: str, branch: str, plan: dict[str, Any], trigger: str) -> list[dict[str, Any]]:
    """``TriggerDagRunOperator`` keyword arguments, one per commit that gets a pipeline run.

    Commits to train get a normal run; ``no_retrain`` and ``rejected`` commits get a run too, whose
    first task records the decision and skips the rest, so every commit shows up in the UI under its
    SHA with the reason as the run note. ``superseded`` commits get no run (recorded by ``record_plan``).
    """
    return [
        {
            "trigger_run_id": run_id_for(decision["commit_sha"], watch=watch_name),
            "conf": _conf(decision, watch_name, branch, trigger),
            "note": run_note(decision, trigger),
        }
        for decision in plan["decisions"]
        if decision["action"] != "superseded"
    ]


def retrain_request(
    watch_name: str, branch: str, schedule: str, plan: dict[str, Any], when: datetime
) -> dict[str, Any]:
    """The run request of a scheduled retraining (``schedule``) of the head of ``branch`` (``plan`` from the
    head alone)."""
    decision = plan["decisions"][0]
    if decision["action"] != "rejected":
        decision = {
            **decision,
            "action": "train",
            "reason": f"scheduled retraining ({schedule}) of the head of {branch!r}",
        }
    return {
        "trigger_run_id": retrain_run_id(decision["commit_sha"], when, watch_name),
        "conf": _conf(decision, watch_name, branch, "schedule"),
        "note": run_note(decision, "schedule"),
    }
