"""Roll back to (or promote) a registered model version by hand, through the pipeline's own deploy path.

``deploy_version`` moves the ``champion`` alias to an earlier version and reconciles every
server exactly as a pipeline run does (``pipeline.deploy`` -> ``gitops_ml.deploy.deploy``: the
smoke sample replayed before the switch, all servers or none, the alias restored on failure),
and it is recorded like any deploy: the run records (and the run-records index), the Git note of
the commit, the MLflow tags of both versions, plus who did it.

The convergence rule (an older commit never deploys over a newer one) does not apply: it keeps
runs that finish out of order from undoing each other, while a rollback is a person's explicit
decision.  A version that failed its gate, or was never registered, is refused.
"""

from __future__ import annotations

import re
import time
from typing import Any

from gitops_ml import pipeline
from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError
from gitops_ml.payloads import Commit

MANUAL_RUN_PREFIX = "manual__"


class RollbackRefused(GitopsMLError):
    """The requested version cannot be deployed by hand (the message says which and why)."""


def _run_id(user: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{MANUAL_RUN_PREFIX}{stamp}__{re.sub(r'[^A-Za-z0-9_.-]', '_', user)[:64]}"


def deploy_version(settings: Settings, model_version: Any, user: str, reason: str | None = None) -> dict[str, Any]:
    """Make ``model_version`` the champion on every server, as ``user`` asked; return what changed.

    Raises ``RollbackRefused`` for a version that is not a registered version of the model, failed
    its gate or is already the champion, and ``DeployError`` (the alias and the servers restored)
    when a server did not take it.
    """
    from gitops_ml import registry  # noqa: PLC0415

    if not isinstance(model_version, (str, int)) or not str(model_version).isdigit():
        raise RollbackRefused(f"model_version must be a version number, got {str(model_version)[:40]!r}")
    model_version = str(int(model_version))
    if reason is not None and not isinstance(reason, str):
        raise RollbackRefused("reason must be a string")
    try:
        target = registry.get_version(settings, model_version)
    except registry.RegistryError:
        raise RollbackRefused(f"model version {model_version} of {settings.model_name} does not exist") from None
    tags = registry.version_tags(target)
    if tags.get("gate") == "failed":
        raise RollbackRefused(
            f"model version {model_version} failed its gate ({tags.get('gate_reasons') or '?'}); it is never deployed"
        )
    if not tags.get("commit_sha"):
        raise RollbackRefused(f"model version {model_version} has no gitops_ml.commit_sha tag: not built by gitops-ml")
    current = registry.get_alias(settings)
    if current is not None and str(current.version) == model_version:
        raise RollbackRefused(f"model version {model_version} is already the champion")
    ever_served = tags.get("deploy_outcome") == "promoted" or bool(tags.get("deployed_at"))
    action = "rolled back" if ever_served else "promoted"
    previous = str(current.version) if current is not None else None
    why = (reason or "").strip()[:500]
    # The commit as the version's lineage tags name it (a rollback target may no longer be on the
    # branch, so it is not resolved again); deploying needs its SHA and branch, not its message.
    commit = Commit(
        commit_sha=tags["commit_sha"],
        branch=tags.get("branch") or settings.branch,
        repo_url=tags.get("repo_url") or settings.repo_url,
        message="",
        author="",
        committed_at="",
    )
    run_id = _run_id(user)
    manual = {"action": action, "by": user, "replaced_version": previous}
    deployed = pipeline.deploy(
        settings,
        commit,
        model_version,
        {"deploy": {"watch_seconds": 0}},
        run_id,
        converge=False,
        manual={**manual, "reason": why or None},
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    registry.set_version_tags(
        settings,
        model_version,
        {
            "manual_deploy_by": user,
            "manual_deploy_at": now,
            "manual_deploy_action": action,
            "manual_deploy_reason": why or None,
        },
    )
    if previous:
        registry.set_version_tags(
            settings,
            previous,
            {
                "deploy_outcome": "rolled_back",
                "rolled_back_at": now,
                "rollback_reason": f"{action} by {user} to version {model_version}" + (f": {why}" if why else ""),
            },
        )
    summary = f"{action.upper()} by {user}: version {model_version} (commit {commit.commit_sha}) serves" + (
        f", replacing version {previous}" if previous else ""
    )
    pipeline.write_note(
        settings,
        commit.commit_sha,
        {
            "gitops_ml_run": run_id,
            "manual_deploy": manual,
            "reason": why or None,
            "model": f"{settings.model_name} version {model_version}",
            "deployed": True,
            "summary": summary,
            "at": now,
        },
    )
    return {
        "model_version": model_version,
        "commit_sha": commit.commit_sha,
        "previous_version": previous,
        "action": action,
        "by": user,
        "run_id": run_id,
        "summary": summary,
        "serving": deployed.serving,
    }
