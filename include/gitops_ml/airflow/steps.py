"""Task bodies of the pipeline DAG: read the context, call one ``gitops_ml.pipeline`` step.

Input errors (bad SHA, params, data) fail the task at once without retries;
other errors are left to Airflow's retry policy.  Every message names the SHA.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from gitops_ml.config import Settings
from gitops_ml.errors import InputError

log = logging.getLogger(__name__)

RUN_ID_PREFIX = "commit__"


def run_id_for(commit_sha: str, suffix: str | None = None) -> str:
    """Run id of the pipeline run for a commit: ``commit__<full sha>`` (plus a suffix for re-runs)."""
    return f"{RUN_ID_PREFIX}{commit_sha}" + (f"__{suffix}" if suffix else "")


def settings_from_context(context) -> Settings:
    params = context["params"]
    return Settings.from_env().with_overrides(repo_url=params.get("repo_url"), branch=params.get("branch"))


def _adapter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            log.error("%s", exc)
            raise AirflowFailException(str(exc)) from None
    return wrapper


@_adapter
def resolve_commit() -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    context = get_current_context()
    settings = settings_from_context(context)
    resolved = pipeline.resolve(settings, context["params"].get("commit_sha") or None)
    commit = resolved["commit"]
    log.info("run %s of dag %s builds commit %s", context["run_id"], context["dag"].dag_id, commit["commit_sha"])
    return {**resolved, "lineage": {"airflow_dag_id": context["dag"].dag_id, "airflow_run_id": context["run_id"]}}


@_adapter
def prepare_workspace(resolved: dict[str, Any]) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.prepare(settings_from_context(get_current_context()), resolved["commit"])


@_adapter
def pull_data(resolved: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.pull_data(settings_from_context(get_current_context()), resolved["commit"],
                              prepared["workdir"], prepared["params"])


def _lineage(resolved: dict[str, Any], pulled: dict[str, Any]) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.lineage(resolved["commit"], pulled["data_hash"], resolved["lineage"]["airflow_dag_id"],
                            resolved["lineage"]["airflow_run_id"])


def _skip_if_registered(resolved: dict[str, Any]) -> None:
    if resolved.get("existing_version"):
        raise AirflowSkipException(f"commit {resolved['commit']['commit_sha']} is already registered as model "
                                   f"version {resolved['existing_version']}: nothing to train")


@_adapter
def train(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.train(settings_from_context(get_current_context()), resolved["commit"], prepared["workdir"],
                          prepared["params"], pulled, _lineage(resolved, pulled))


@_adapter
def evaluate(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any],
             trained: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.evaluate(settings_from_context(get_current_context()), resolved["commit"],
                             prepared["params"], pulled, trained)


@_adapter
def register(resolved: dict[str, Any], pulled: dict[str, Any], trained: dict[str, Any],
             evaluated: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.register(settings_from_context(get_current_context()), trained, evaluated,
                             _lineage(resolved, pulled))


@_adapter
def deploy(resolved: dict[str, Any], registered: dict[str, Any] | None) -> dict[str, Any]:
    from gitops_ml import pipeline, registry  # noqa: PLC0415

    settings = settings_from_context(get_current_context())
    commit = resolved["commit"]
    if registered:
        model_version, gate_passed = registered["model_version"], registered["gate_passed"]
    else:  # reused: the commit was registered by an earlier run
        model_version = resolved["existing_version"]
        gate_passed = registry.version_tags(registry.get_version(settings, model_version)).get("gate") != "failed"
    if not gate_passed:
        raise AirflowSkipException(f"not promoted: model version {model_version} of commit "
                                   f"{commit['commit_sha']} failed the evaluation gate; serving model unchanged")
    return pipeline.deploy(settings, commit, model_version)


@_adapter
def record(resolved: dict[str, Any], pulled: dict[str, Any], deployed: dict[str, Any] | None) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    context = get_current_context()
    settings = settings_from_context(context)
    outcome = {"data_hash": pulled["data_hash"], "model_version": (deployed or {}).get("model_version"),
               "deployed": bool(deployed), "reused": bool(resolved.get("existing_version"))}
    pipeline.record(settings, resolved["commit"], context["run_id"], "pipeline",
                    "success" if deployed else "not_promoted", **outcome)
    return outcome


def record_failure(context) -> None:
    """``on_failure_callback``: write the failed step and its reason against the SHA (when known)."""
    from gitops_ml import pipeline  # noqa: PLC0415

    try:
        settings = settings_from_context(context)
        ti = context["ti"]
        resolved = ti.xcom_pull(task_ids="resolve_commit") or {}
        commit = resolved.get("commit") or {"commit_sha": context["params"].get("commit_sha") or "unknown"}
        pipeline.record(settings, commit, context["run_id"], ti.task_id, "failure",
                        reason=str(context.get("exception") or "unknown"))
    except Exception:  # noqa: BLE001 - a failing callback must not hide the task's own error
        log.exception("could not record the failure of run %s", context.get("run_id"))
