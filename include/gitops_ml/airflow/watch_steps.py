"""Task bodies of the watcher and retraining DAGs, and the run requests the webhook creates.

One pipeline run per commit is guaranteed by the run id, ``commit__<sha>`` (``commit__<sha>__<watch>``
for a watched repository not named ``default``, see ``steps.run_id_for``): Airflow refuses a
second run with the same id, whoever asks (watcher, webhook, a restarted scheduler, the CLI),
and ``TriggerDagRunOperator(skip_when_already_exists=True)`` turns that refusal into "skipped".
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from gitops_ml.airflow.steps import run_id_for
from gitops_ml.config import Settings

log = logging.getLogger(__name__)


def _note(decision: dict[str, Any], trigger: str) -> str:
    sha = decision["commit_sha"]
    head = {"train": f"{trigger}: build commit {sha}",
            "no_retrain": f"NO RETRAIN NEEDED for commit {sha}",
            "rejected": f"REJECTED commit {sha}"}[decision["action"]]
    note = f"{head}: {decision['reason']}"
    if decision.get("warning"):
        note += f"\n\nWARNING (signature policy warn): {decision['warning']}"
    return note


def run_requests(watch_name: str, branch: str, plan: dict[str, Any], trigger: str) -> list[dict[str, Any]]:
    """``TriggerDagRunOperator`` keyword arguments, one per commit that gets a pipeline run.

    Commits to train get a normal run; ``no_retrain`` and ``rejected`` commits get a run too, whose
    first task records the decision and skips the rest, so every commit shows up in the UI under its
    SHA with the reason as the run note. ``superseded`` commits get no run (recorded by ``record_plan``).
    """
    requests = []
    for decision in plan["decisions"]:
        if decision["action"] == "superseded":
            continue
        conf = {"commit_sha": decision["commit_sha"], "watch": watch_name, "branch": branch,
                "trigger": trigger, "decision": decision["action"], "reason": decision["reason"]}
        if decision.get("warning"):
            conf["signature_warning"] = decision["warning"]
        requests.append({"trigger_run_id": run_id_for(decision["commit_sha"], watch=watch_name), "conf": conf,
                         "note": _note(decision, trigger)})
    return requests


def record_plan(settings: Settings, plan: dict[str, Any], run_id: str) -> None:
    """Record what gets no run: superseded commits and force-pushes (records, Elasticsearch, Git notes)."""
    from gitops_ml import pipeline  # noqa: PLC0415

    for decision in plan["decisions"]:
        if decision["action"] == "superseded":
            commit = {"commit_sha": decision["commit_sha"]}
            log.info("commit %s skipped: %s", decision["commit_sha"], decision["reason"])
            pipeline.record(settings, commit, run_id, "watch", "superseded", reason=decision["reason"],
                            superseded_by=decision["superseded_by"])
            pipeline.write_note(settings, commit, {"gitops_ml_run": None, "decision": "superseded",
                                                   "superseded_by": decision["superseded_by"]})
    if plan.get("force_push"):
        removed = plan["force_push"]["removed"]
        log.warning("force-push detected on branch %r: %d commit(s) removed: %s", plan["branch"], len(removed),
                    ", ".join(removed))
        pipeline.record(settings, {"commit_sha": plan["head_sha"]}, run_id, "watch", "force_push",
                        reason=f"force-push removed {len(removed)} commit(s) from branch {plan['branch']!r}",
                        removed_commits=removed, previous_sha=plan["previous_sha"])


def settings_for(watch) -> Settings:
    return Settings.from_env().with_overrides(repo_url=watch.url, branch=watch.branch, model_name=watch.model_name)


def plan_commits(watch_name: str, found: dict[str, Any] | None, run_id: str) -> list[dict[str, Any]]:
    """Watcher task: from the sensor's result to the pipeline runs to start."""
    from gitops_ml import watch  # noqa: PLC0415

    if not found:
        return []
    watched = watch.get_watch(watch_name)
    settings = settings_for(watched)
    plan = watch.plan_branch(watched, settings.git_cache_dir, found.get("previous_sha"), found["head_sha"]).to_dict()
    for decision in plan["decisions"]:
        log.info("commit %s: %s (%s)", decision["commit_sha"], decision["action"], decision["reason"])
    record_plan(settings, plan, run_id)
    return run_requests(watched.name, watched.branch, plan, trigger="push")


def advance_cursor(watch_name: str, found: dict[str, Any] | None) -> str | None:
    """Remember the head the watcher has handled (an Airflow Variable, visible in the UI)."""
    from airflow.sdk import Variable  # noqa: PLC0415

    from gitops_ml import watch  # noqa: PLC0415

    if not found:
        return None
    Variable.set(watch.get_watch(watch_name).cursor_key, found["head_sha"],
                 description=f"last commit planned by the gitops-ml watcher of {watch_name!r}")
    return found["head_sha"]


def plan_retrain(watch_name: str, when: datetime) -> list[dict[str, Any]]:
    """Retraining DAG task: one pipeline run for the head of the branch, named by SHA + schedule time."""
    from gitops_ml import watch  # noqa: PLC0415

    watched = watch.get_watch(watch_name)
    settings = settings_for(watched)
    plan = watch.plan_branch(watched, settings.git_cache_dir, None).to_dict()
    decision = plan["decisions"][0]
    if decision["action"] == "rejected":
        log.error("scheduled retraining of %s refused: %s", decision["commit_sha"], decision["reason"])
        record_plan(settings, plan, "retrain")
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    conf = {"commit_sha": decision["commit_sha"], "watch": watched.name, "branch": watched.branch,
            "trigger": "schedule", "decision": decision["action"] if decision["action"] == "rejected" else "train",
            "reason": decision["reason"] if decision["action"] == "rejected"
            else f"scheduled retraining ({watched.retrain_schedule}) of the head of {watched.branch!r}"}
    if decision.get("warning"):
        conf["signature_warning"] = decision["warning"]
    note = _note({**decision, "action": conf["decision"], "reason": conf["reason"]}, "schedule")
    suffix = "" if watched.name == "default" else f"__{watched.name}"
    return [{"trigger_run_id": f"retrain__{decision['commit_sha']}__{stamp}{suffix}", "conf": conf, "note": note}]
