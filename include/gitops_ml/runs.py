"""Names and plans of pipeline runs: which runs a push or a schedule asks for, and what they are called.

One pipeline run per commit is guaranteed by the run id, ``commit__<sha>`` (``commit__<sha>__<watch>``
for a watched repository not named ``default``): Airflow refuses a second run with the same id,
whoever asks (watcher, webhook, a restarted scheduler, the CLI), and
``TriggerDagRunOperator(skip_when_already_exists=True)`` turns that refusal into "skipped".

Nothing here imports Airflow or a backend: the DAG files, the webhook, the CLI and the REST
client all take their names from this module.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gitops_ml.config import Settings
    from gitops_ml.watch import Watch

__all__ = [
    "DEFAULT_WATCH",
    "PIPELINE_DAG_ID",
    "RUN_ID_PREFIX",
    "plan_retrain",
    "plan_runs",
    "record_plan",
    "retrain_dag_id",
    "retrain_request",
    "retrain_run_id",
    "run_id_for",
    "run_note",
    "run_requests",
    "settings_for",
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


def settings_for(watch: Watch) -> Settings:
    """The settings of a run of ``watch``: the environment, with the watch's URL, branch, model name and
    model servers."""
    from gitops_ml.config import Settings  # noqa: PLC0415

    return Settings.from_env().with_overrides(
        repo_url=watch.url, branch=watch.branch, model_name=watch.model_name, serving_url=watch.serving_url
    )


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


def retrain_request(watch: Watch, plan: dict[str, Any], when: datetime) -> dict[str, Any]:
    """The run request of a scheduled retraining of the head (``plan`` from the head alone)."""
    decision = plan["decisions"][0]
    if decision["action"] != "rejected":
        decision = {
            **decision,
            "action": "train",
            "reason": f"scheduled retraining ({watch.retrain_schedule}) of the head of {watch.branch!r}",
        }
    return {
        "trigger_run_id": retrain_run_id(decision["commit_sha"], when, watch.name),
        "conf": _conf(decision, watch.name, watch.branch, "schedule"),
        "note": run_note(decision, "schedule"),
    }


def record_plan(settings: Settings, plan: dict[str, Any], run_id: str) -> None:
    """Record what gets no run: superseded commits and force-pushes (records, Elasticsearch, Git notes)."""
    from gitops_ml import pipeline  # noqa: PLC0415

    for decision in plan["decisions"]:
        if decision["action"] == "superseded":
            log.info("commit %s skipped: %s", decision["commit_sha"], decision["reason"])
            pipeline.record(
                settings,
                decision["commit_sha"],
                run_id,
                "watch",
                "superseded",
                reason=decision["reason"],
                superseded_by=decision["superseded_by"],
            )
            pipeline.write_note(
                settings,
                decision["commit_sha"],
                {"gitops_ml_run": None, "decision": "superseded", "superseded_by": decision["superseded_by"]},
            )
    if plan.get("force_push"):
        removed = plan["force_push"]["removed"]
        log.warning(
            "force-push detected on branch %r: %d commit(s) removed: %s",
            plan["branch"],
            len(removed),
            ", ".join(removed),
        )
        pipeline.record(
            settings,
            plan["head_sha"],
            run_id,
            "watch",
            "force_push",
            reason=f"force-push removed {len(removed)} commit(s) from branch {plan['branch']!r}",
            removed_commits=removed,
            previous_sha=plan["previous_sha"],
        )


def plan_runs(
    watch: Watch, settings: Settings, previous_sha: str | None, head_sha: str, run_id: str, trigger: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Plan the commits from ``previous_sha`` to ``head_sha`` of ``watch``, record what gets no run, and
    return the plan with the run requests (the watcher and the push webhook both start runs so)."""
    from gitops_ml import watch as watch_mod  # noqa: PLC0415

    plan = watch_mod.plan_branch(watch, settings.git_cache_dir, previous_sha, head_sha).to_dict()
    for decision in plan["decisions"]:
        log.info("commit %s: %s (%s)", decision["commit_sha"], decision["action"], decision["reason"])
    record_plan(settings, plan, run_id)
    return plan, run_requests(watch.name, watch.branch, plan, trigger)


def plan_retrain(watch: Watch, when: datetime) -> list[dict[str, Any]]:
    """The one run of a scheduled retraining of the head of ``watch``'s branch (a rejected head is recorded)."""
    from gitops_ml import watch as watch_mod  # noqa: PLC0415

    settings = settings_for(watch)
    plan = watch_mod.plan_branch(watch, settings.git_cache_dir, None).to_dict()
    decision = plan["decisions"][0]
    if decision["action"] == "rejected":
        log.error("scheduled retraining of %s refused: %s", decision["commit_sha"], decision["reason"])
        record_plan(settings, plan, "retrain")
    return [retrain_request(watch, plan, when)]
