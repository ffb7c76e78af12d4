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

PIPELINE_DAG_ID = "gitops_ml_pipeline"
RUN_ID_PREFIX = "commit__"


DEFAULT_WATCH = "default"


def run_id_for(commit_sha: str, suffix: str | None = None, watch: str | None = None) -> str:
    """Run id of the pipeline run for a commit: ``commit__<full sha>``, for a repository watched
    under another name than ``default`` ``commit__<sha>__<watch>`` (one run per SHA and watched
    branch: the same SHA on two watched branches or forks gets a run for each), plus a suffix
    for re-runs."""
    run_id = f"{RUN_ID_PREFIX}{commit_sha}" + (f"__{watch}" if watch and watch != DEFAULT_WATCH else "")
    return run_id + (f"__{suffix}" if suffix else "")


def settings_from_context(context) -> Settings:
    """Settings of this run: the environment, then the watched repository named in the conf
    (``watch``: URL with its credentials, branch, model name), then explicit ``repo_url``/``branch``."""
    params = context["params"]
    settings = Settings.from_env()
    if params.get("watch"):
        from gitops_ml.watch import get_watch  # noqa: PLC0415

        watched = get_watch(params["watch"])
        settings = settings.with_overrides(repo_url=watched.url, branch=watched.branch, model_name=watched.model_name,
                                           serving_url=watched.serving_url)
    return settings.with_overrides(repo_url=params.get("repo_url"), branch=params.get("branch"))


def _log_labels(context, args: tuple) -> dict[str, Any]:
    from gitops_ml.refs import redact_url  # noqa: PLC0415

    commit = args[0].get("commit", {}) if args and isinstance(args[0], dict) else {}
    settings = settings_from_context(context)
    ti = context["ti"]
    return {"commit_sha": commit.get("commit_sha") or context["params"].get("commit_sha") or "unresolved",
            "repo_url": commit.get("repo_url") or redact_url(settings.repo_url),
            "branch": commit.get("branch") or settings.branch, "dag_id": ti.dag_id, "run_id": ti.run_id,
            "task_id": ti.task_id, "map_index": ti.map_index, "try_number": ti.try_number}


def _airflow_masker() -> Callable[[str], str] | None:
    """Airflow's secrets masker (connection passwords, sensitive variables) for our shipped lines."""
    try:
        from airflow.sdk._shared.secrets_masker import redact  # noqa: PLC0415
    except ImportError:  # moved in another Airflow version: our own URL/token redaction still applies
        return None
    return lambda message: str(redact(message))


def _adapter(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ship the task's log lines (ECS, labelled with the SHA) and turn input errors into failures."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gitops_ml import logs  # noqa: PLC0415
        from gitops_ml.airflow.remote_log import uploads_task_log_file  # noqa: PLC0415

        context = get_current_context()
        # The last task of a run waits a while for an unreachable Elasticsearch, so that an outage
        # during the run is delivered before the run ends; earlier tasks leave it to the later ones.
        # Without ES_URL nothing ships, so nothing waits (``logs.capture``).
        wait = Settings.from_env().ship_wait_seconds if fn.__name__ == "record" else 0.0
        # On a worker with remote logging, Airflow's supervisor ships the task's whole log file
        # (runner lines, stdout/stderr, warnings, tracebacks) once the task ends, with this wait.
        with logs.capture(settings_from_context(context).home, _log_labels(context, args),
                          ship_wait_seconds=wait, redactor=_airflow_masker(),
                          shipped_by_supervisor=uploads_task_log_file()) as handler:
            try:
                result = fn(*args, **kwargs)
            except InputError as exc:
                log.error("%s", exc)
                raise AirflowFailException(str(exc)) from None
            if isinstance(result, dict) and isinstance(result.get("commit"), dict):
                handler.labels["commit_sha"] = result["commit"]["commit_sha"]  # resolve_commit found it
            return result
    return wrapper


def _push_outcome(context, summary: str) -> None:
    """The sentence that ends the run's note (see ``gitops_ml.airflow.run_note``)."""
    from gitops_ml.airflow.run_note import OUTCOME_KEY  # noqa: PLC0415

    try:
        context["ti"].xcom_push(OUTCOME_KEY, summary)
    except Exception as exc:  # noqa: BLE001 - the outcome is in the records and the Git note too
        log.warning("could not hand the outcome to the run note: %s", exc)


def _refuse_conf_credentials(repo_url: str | None) -> None:
    """A run conf is stored in the Airflow DB and shown in the UI: a URL in it must not hold credentials."""
    from gitops_ml.refs import redact_url  # noqa: PLC0415

    if repo_url and redact_url(repo_url) != repo_url:
        raise InputError(f"run conf repo_url {redact_url(repo_url)} carries credentials: they would be stored in the "
                         "Airflow DB and shown in the UI; configure the repository as a watch (its URL may read "
                         "${TOKEN} from the environment) and pass the watch name instead")


@_adapter
def resolve_commit() -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    context = get_current_context()
    params = context["params"]
    _refuse_conf_credentials(params.get("repo_url"))
    settings = settings_from_context(context)
    resolved = pipeline.resolve(settings, params.get("commit_sha") or None, params.get("watch") or None)
    commit = resolved["commit"]
    decision = params.get("decision") or "train"
    if decision in ("no_retrain", "rejected"):  # the watcher decided: record it against the SHA, run nothing
        reason = params.get("reason") or decision
        log.log(logging.WARNING if decision == "rejected" else logging.INFO, "commit %s: %s", commit["commit_sha"], reason)
        pipeline.record(settings, commit, context["run_id"], "watch", decision, reason=reason)
        pipeline.write_note(settings, commit, {"gitops_ml_run": context["run_id"], "decision": decision,
                                               "reason": reason, "deployed": False})
        _push_outcome(context, f"REJECTED commit {commit['commit_sha']}: {reason}" if decision == "rejected"
                      else f"NO RETRAIN NEEDED: {reason.removeprefix('no retrain needed: ')}")
        raise AirflowSkipException(f"commit {commit['commit_sha']}: {reason}")
    if resolved.get("signature_warning"):  # checked again at resolve, whatever the run conf says
        log.warning("commit %s: signature policy warn: %s", commit["commit_sha"], resolved["signature_warning"])
        pipeline.record(settings, commit, context["run_id"], "signature", "warning",
                        reason=resolved["signature_warning"])
    log.info("run %s of dag %s builds commit %s (%s)", context["run_id"], context["dag"].dag_id, commit["commit_sha"],
             params.get("trigger") or "manual")
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


def _lineage(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any]) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.lineage(resolved["commit"], pulled["data_hash"], resolved["lineage"]["airflow_dag_id"],
                            resolved["lineage"]["airflow_run_id"], prepared["inputs_hash"],
                            prepared.get("model_code_hash"))


def _existing_version(resolved: dict[str, Any], prepared: dict[str, Any]) -> str | None:
    return resolved.get("existing_version") or prepared.get("reuse_version")


def _skip_if_registered(resolved: dict[str, Any], prepared: dict[str, Any]) -> None:
    existing = _existing_version(resolved, prepared)
    if existing:
        why = ("this commit is already registered" if resolved.get("existing_version")
               else "a version with the same data, params and model code exists")
        raise AirflowSkipException(f"commit {resolved['commit']['commit_sha']}: {why} as model version "
                                   f"{existing}: nothing to train")


@_adapter
def train(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved, prepared)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.train(settings_from_context(get_current_context()), resolved["commit"], prepared["workdir"],
                          prepared["params"], pulled, _lineage(resolved, prepared, pulled))


@_adapter
def evaluate(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any],
             trained: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved, prepared)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.evaluate(settings_from_context(get_current_context()), resolved["commit"],
                             prepared["params"], pulled, trained)


@_adapter
def register(resolved: dict[str, Any], prepared: dict[str, Any], pulled: dict[str, Any], trained: dict[str, Any],
             evaluated: dict[str, Any]) -> dict[str, Any]:
    _skip_if_registered(resolved, prepared)
    from gitops_ml import pipeline  # noqa: PLC0415

    return pipeline.register(settings_from_context(get_current_context()), trained, evaluated,
                             _lineage(resolved, prepared, pulled))


@_adapter
def deploy(resolved: dict[str, Any], prepared: dict[str, Any], registered: dict[str, Any] | None) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    context = get_current_context()
    settings = settings_from_context(context)
    commit = resolved["commit"]
    if registered:
        model_version, gate_passed = registered["model_version"], registered["gate_passed"]
        reasons = "; ".join(registered.get("gate_reasons") or [])
    else:  # reused: registered by an earlier run of this commit or of one with the same inputs
        model_version = _existing_version(resolved, prepared)
        gate_passed, reasons = pipeline.gate_of(settings, model_version)
    if not gate_passed:
        outcome = pipeline.finish(settings, commit, context["run_id"], model_version, None, reused=not registered)
        _push_outcome(context, outcome["summary"])
        raise AirflowSkipException(f"NOT PROMOTED: model version {model_version} of commit {commit['commit_sha']} "
                                   f"failed the evaluation gate ({reasons}); the serving model is unchanged")
    return pipeline.deploy(settings, commit, model_version, prepared["params"], context["run_id"])


@_adapter
def record(resolved: dict[str, Any], prepared: dict[str, Any], deployed: dict[str, Any] | None) -> dict[str, Any]:
    from gitops_ml import pipeline  # noqa: PLC0415

    context = get_current_context()
    if not deployed:
        raise AirflowSkipException("nothing deployed: the deploy step recorded the outcome")
    outcome = pipeline.finish(settings_from_context(context), resolved["commit"], context["run_id"],
                              deployed["model_version"], deployed, reused=bool(_existing_version(resolved, prepared)))
    _push_outcome(context, outcome["summary"])
    return outcome


def record_failure(context) -> None:
    """``on_failure_callback``: write the failed step and its reason against the SHA (when known)."""
    from gitops_ml import pipeline  # noqa: PLC0415

    try:
        settings = settings_from_context(context)
        ti = context["ti"]
        resolved = ti.xcom_pull(task_ids="resolve_commit") or {}
        commit = resolved.get("commit") or {"commit_sha": context["params"].get("commit_sha") or "unknown"}
        reason = str(context.get("exception") or "unknown")
        pipeline.record(settings, commit, context["run_id"], ti.task_id, "failure", reason=reason)
        _push_outcome(context, f"FAILED in step {ti.task_id}: {reason}")
        if resolved.get("commit"):
            pipeline.write_note(settings, commit, {"gitops_ml_run": context["run_id"], "failed_step": ti.task_id,
                                                   "reason": reason, "deployed": False})
        from gitops_ml import retention  # noqa: PLC0415
        retention.after_run(settings, commit["commit_sha"], failed=True, run_id=context["run_id"])  # never raises
    except Exception:  # noqa: BLE001 - a failing callback must not hide the task's own error
        log.exception("could not record the failure of run %s", context.get("run_id"))
