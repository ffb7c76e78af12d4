"""Task bodies of the pipeline DAG: translation only, between Airflow and ``gitops_ml.flow``.

Each task reads its context (the run conf, the run id) and its upstream XCom, calls one step of
``gitops_ml.flow`` / ``gitops_ml.pipeline`` (where the run's rules live, shared with
``gitops-ml run --local``), and translates back: a ``flow.Skip`` becomes ``AirflowSkipException``
(its outcome sentence is pushed for the run note), an input error (bad SHA, params, data)
``AirflowFailException`` (no retries); other errors are left to Airflow's retry policy.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn, get_type_hints

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from pydantic import TypeAdapter

from gitops_ml.config import Settings
from gitops_ml.errors import InputError
from gitops_ml.payloads import Deployed, Evaluated, Payload, Prepared, Pulled, Registered, Resolved, RunConf, Trained

log = logging.getLogger(__name__)


def conf_from_context(context) -> RunConf:
    """The run conf (the DAG's params) of this run."""
    return RunConf.parse(dict(context["params"]))


def settings_from_context(context) -> Settings:
    """Settings of this run (see ``flow.settings_for``)."""
    from gitops_ml import flow

    return flow.settings_for(conf_from_context(context))


def _log_labels(context, args: tuple) -> dict[str, Any]:
    from gitops_ml.refs import redact_url

    commit = args[0].get("commit", {}) if args and isinstance(args[0], dict) else {}
    settings = settings_from_context(context)
    ti = context["ti"]
    return {
        "commit_sha": commit.get("commit_sha") or context["params"].get("commit_sha") or "unresolved",
        "repo_url": commit.get("repo_url") or redact_url(settings.repo_url),
        "branch": commit.get("branch") or settings.branch,
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "map_index": ti.map_index,
        "try_number": ti.try_number,
    }


def _payload_types(fn: Callable[..., Any]) -> list[TypeAdapter]:
    """A validator per positional parameter of a task body, from its annotation (``Resolved``, ``Deployed | None``)."""
    hints = get_type_hints(fn)
    return [TypeAdapter(hints[name]) for name in inspect.signature(fn).parameters]


def _adapter(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Translate one task body: its XCom arguments validated into their payload types and its payload dumped
    back to JSON; the task's log lines shipped (ECS, labelled with the SHA); input errors turned into failures."""
    payload_types = _payload_types(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        from gitops_ml import logs
        from gitops_ml.airflow.remote_log import airflow_masker, uploads_task_log_file

        context = get_current_context()
        # The last task of a run waits a while for an unreachable Elasticsearch, so that an outage
        # during the run is delivered before the run ends; earlier tasks leave it to the later ones.
        # Without ES_URL nothing ships, so nothing waits (``logs.capture``).
        wait = Settings.from_env().ship_wait_seconds if fn.__name__ == "record" else 0.0
        # On a worker with remote logging, Airflow's supervisor ships the task's whole log file
        # (runner lines, stdout/stderr, warnings, tracebacks) once the task ends, with this wait.
        with logs.capture(
            settings_from_context(context).home,
            _log_labels(context, args),
            ship_wait_seconds=wait,
            redactor=airflow_masker(),
            shipped_by_supervisor=uploads_task_log_file(),
        ) as handler:
            try:
                result = fn(*(kind.validate_python(value) for kind, value in zip(payload_types, args, strict=True)))
            except InputError as exc:
                log.error("%s", exc)
                raise AirflowFailException(str(exc)) from None
            if isinstance(result, Payload):
                result = result.dump()
            if isinstance(result, dict) and isinstance(result.get("commit"), dict):
                handler.labels["commit_sha"] = result["commit"]["commit_sha"]  # resolve_commit found it
            return result

    return wrapper


def _push_outcome(context, summary: str) -> None:
    """The sentence that ends the run's note (see ``gitops_ml.airflow.run_note``)."""
    from gitops_ml.airflow.run_note import OUTCOME_KEY

    try:
        context["ti"].xcom_push(OUTCOME_KEY, summary)
    except Exception as exc:  # noqa: BLE001 - the outcome is in the records and the Git note too
        log.warning("could not hand the outcome to the run note: %s", exc)


def _skip(context, skip) -> NoReturn:
    """A ``flow.Skip`` as Airflow says it: the outcome to the run note, the task skipped with the reason."""
    if skip.outcome:
        _push_outcome(context, skip.outcome)
    raise AirflowSkipException(skip.reason)


def _skip_training(resolved: Resolved, prepared: Prepared) -> None:
    from gitops_ml import flow

    skip = flow.skip_training(resolved, prepared)
    if skip is not None:
        _skip(get_current_context(), skip)


@_adapter
def resolve_commit() -> Resolved:
    from gitops_ml import flow

    context = get_current_context()
    conf = conf_from_context(context)
    resolved = flow.start(flow.settings_for(conf), conf, context["run_id"], context["dag"].dag_id)
    if isinstance(resolved, flow.Skip):
        _skip(context, resolved)
    return resolved


@_adapter
def prepare_workspace(resolved: Resolved) -> Prepared:
    from gitops_ml import pipeline

    return pipeline.prepare(settings_from_context(get_current_context()), resolved.commit)


@_adapter
def pull_data(resolved: Resolved, prepared: Prepared) -> Pulled:
    from gitops_ml import pipeline

    return pipeline.pull_data(
        settings_from_context(get_current_context()), resolved.commit, prepared.workdir, prepared.params
    )


@_adapter
def train(resolved: Resolved, prepared: Prepared, pulled: Pulled) -> Trained:
    _skip_training(resolved, prepared)
    from gitops_ml import flow, pipeline

    return pipeline.train(
        settings_from_context(get_current_context()),
        resolved.commit,
        prepared.params,
        flow.lineage(resolved, prepared, pulled),
    )


@_adapter
def evaluate(resolved: Resolved, prepared: Prepared, trained: Trained) -> Evaluated:
    _skip_training(resolved, prepared)
    from gitops_ml import pipeline

    return pipeline.evaluate(settings_from_context(get_current_context()), resolved.commit, prepared.params, trained)


@_adapter
def register(
    resolved: Resolved, prepared: Prepared, pulled: Pulled, trained: Trained, evaluated: Evaluated
) -> Registered:
    _skip_training(resolved, prepared)
    from gitops_ml import flow, pipeline

    return pipeline.register(
        settings_from_context(get_current_context()), trained, evaluated, flow.lineage(resolved, prepared, pulled)
    )


@_adapter
def deploy(resolved: Resolved, prepared: Prepared, registered: Registered | None) -> Deployed:
    from gitops_ml import flow, pipeline

    context = get_current_context()
    settings = settings_from_context(context)
    model_version, not_promoted = flow.check_gate(settings, resolved, prepared, registered, context["run_id"])
    if not_promoted is not None:
        _skip(context, not_promoted)
    return pipeline.deploy(settings, resolved.commit, model_version, prepared.params, context["run_id"])


@_adapter
def record(resolved: Resolved, prepared: Prepared, deployed: Deployed | None) -> dict[str, Any]:
    from gitops_ml import flow

    context = get_current_context()
    if deployed is None:  # deploy was skipped (the gate), yet this task runs (its trigger rule)
        raise AirflowSkipException("nothing deployed: the deploy step recorded the outcome")
    outcome = flow.finish(settings_from_context(context), resolved, prepared, deployed, context["run_id"])
    _push_outcome(context, outcome["summary"])
    return outcome


def record_failure(context) -> None:
    """``on_failure_callback``: write the failed step and its reason against the SHA (``flow.record_failure``)."""
    from gitops_ml import flow

    try:
        ti = context["ti"]
        resolved = ti.xcom_pull(task_ids="resolve_commit")
        commit = Resolved.model_validate(resolved).commit if resolved else None
        summary = flow.record_failure(
            settings_from_context(context),
            commit,
            context["params"].get("commit_sha"),
            context["run_id"],
            ti.task_id,
            str(context.get("exception") or "unknown"),
        )
        _push_outcome(context, summary)
    except Exception:  # a failing callback must not hide the task's own error
        log.exception("could not record the failure of run %s", context.get("run_id"))
