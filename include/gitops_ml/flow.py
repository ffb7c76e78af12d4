"""The control flow of one pipeline run and its rules, in one place.

    start -> prepare -> pull_data -> train -> evaluate -> register -> gate -> deploy -> finish
                                     (skipped when a version can be reused)

The Airflow tasks (``gitops_ml.airflow.steps``) and ``gitops-ml run --local`` (``run_local``) both
call these functions, so the two cannot diverge.  A rule that stops the run returns a ``Skip``
with its reason and the sentence that ends the run note; the caller turns it into an Airflow
skip or stops the local run.  The rules:

- **watch decision**: a run the watcher decided is ``no_retrain`` or ``rejected`` records the
  decision against the SHA, writes the Git note and runs nothing;
- **signature warning**: the commit's signature policy is applied again at resolve (whatever the
  conf says); ``warn`` records the warning and goes on;
- **reuse**: a commit already registered, or with the same data, params and model code as a
  registered version (``git revert``), skips train/evaluate/register and deploys that version;
- **gate**: a version that failed the evaluation gate is NOT PROMOTED: the run's outcome is
  recorded, the serving model is untouched;
- **finish**: the final record, the Git note and the disk cleanup of a run that deployed;
- **failure**: a step that fails records the step and its reason against the SHA.

Before any run, ``plan_runs`` (the watcher and the push webhook) and ``plan_retrain`` (the retraining
schedule) plan the commits of a branch and record what gets no run (superseded commits,
force-pushes); the run requests and their names come from ``gitops_ml.runs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gitops_ml import pipeline
from gitops_ml.config import Settings
from gitops_ml.errors import GitopsMLError, InputError
from gitops_ml.payloads import Commit, Deployed, LocalRun, Prepared, Pulled, Registered, Resolved, RunConf, RunIds

if TYPE_CHECKING:
    from gitops_ml.watch import Watch

__all__ = [
    "STEPS",
    "Skip",
    "check_gate",
    "finish",
    "lineage",
    "plan_retrain",
    "plan_runs",
    "record_failure",
    "record_plan",
    "refuse_conf_credentials",
    "reused_version",
    "run_local",
    "settings_for",
    "skip_training",
    "start",
]

log = logging.getLogger(__name__)

STEPS = ("resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record")
"""The steps of a run, in order (the task ids of the pipeline DAG, the step names of the records)."""


@dataclass(frozen=True)
class Skip:
    """A rule says the step (and those after it) do not run.

    :param reason: why, naming the SHA (the task's skip message, the local run's log line).
    :param outcome: the sentence that ends the run's note, when this skip decides the run's outcome.
    :param finished: the run's final outcome (``pipeline.finish``), when this skip ended the run.
    """

    reason: str
    outcome: str | None = None
    finished: dict[str, Any] | None = None


def settings_for(conf: RunConf) -> Settings:
    """Settings of a run: the environment, then the watched repository named in the conf
    (``watch``: URL with its credentials, branch, model name, model servers), then explicit
    ``repo_url``/``branch``."""
    from gitops_ml import watch  # noqa: PLC0415

    settings = watch.get_watch(conf.watch).run_settings() if conf.watch else Settings.from_env()
    return settings.with_overrides(repo_url=conf.repo_url, branch=conf.branch)


def refuse_conf_credentials(repo_url: str | None) -> None:
    """A run conf is stored in the Airflow DB and shown in the UI: a URL in it must not hold credentials."""
    from gitops_ml.refs import redact_url  # noqa: PLC0415

    if repo_url and redact_url(repo_url) != repo_url:
        raise InputError(
            f"run conf repo_url {redact_url(repo_url)} carries credentials: they would be stored in the "
            "Airflow DB and shown in the UI; configure the repository as a watch (its URL may read "
            "${TOKEN} from the environment) and pass the watch name instead"
        )


def start(settings: Settings, conf: RunConf, run_id: str, dag_id: str) -> Resolved | Skip:
    """Resolve the commit, apply the watch decision and the signature policy; the ``Resolved`` payload
    (commit, existing version, signature warning, run ids) or a ``Skip`` for a decided run."""
    refuse_conf_credentials(conf.repo_url)
    resolved = pipeline.resolve(settings, conf.commit_sha, conf.watch)
    commit_sha = resolved.commit.commit_sha
    decision = conf.decision or "train"
    if decision in ("no_retrain", "rejected"):  # the watcher decided: record it against the SHA, run nothing
        reason = conf.reason or decision
        log.log(logging.WARNING if decision == "rejected" else logging.INFO, "commit %s: %s", commit_sha, reason)
        pipeline.record(settings, commit_sha, run_id, "watch", decision, reason=reason)
        pipeline.write_note(
            settings, commit_sha, {"gitops_ml_run": run_id, "decision": decision, "reason": reason, "deployed": False}
        )
        return Skip(
            f"commit {commit_sha}: {reason}",
            f"REJECTED commit {commit_sha}: {reason}"
            if decision == "rejected"
            else f"NO RETRAIN NEEDED: {reason.removeprefix('no retrain needed: ')}",
        )
    if resolved.signature_warning:  # checked again at resolve, whatever the run conf says
        log.warning("commit %s: signature policy warn: %s", commit_sha, resolved.signature_warning)
        pipeline.record(settings, commit_sha, run_id, "signature", "warning", reason=resolved.signature_warning)
    log.info("run %s of dag %s builds commit %s (%s)", run_id, dag_id, commit_sha, conf.trigger or "manual")
    return resolved.model_copy(update={"run": RunIds(airflow_dag_id=dag_id, airflow_run_id=run_id)})


def reused_version(resolved: Resolved, prepared: Prepared) -> str | None:
    """The registered version this run deploys instead of training one: the commit's own, else one
    built from the same data, params and model code."""
    return resolved.existing_version or prepared.reuse_version


def skip_training(resolved: Resolved, prepared: Prepared) -> Skip | None:
    """The reuse rule: a ``Skip`` of train, evaluate and register when a version can be reused."""
    existing = reused_version(resolved, prepared)
    if not existing:
        return None
    why = (
        "this commit is already registered"
        if resolved.existing_version
        else "a version with the same data, params and model code exists"
    )
    return Skip(f"commit {resolved.commit.commit_sha}: {why} as model version {existing}: nothing to train")


def lineage(resolved: Resolved, prepared: Prepared, pulled: Pulled) -> dict[str, Any]:
    """The lineage tags of the MLflow run and the model version of this run."""
    run = resolved.run or RunIds(airflow_dag_id=None, airflow_run_id=None)
    return pipeline.lineage(
        resolved.commit,
        pulled.data_hash,
        run.airflow_dag_id,
        run.airflow_run_id,
        prepared.inputs_hash,
        prepared.model_code_hash,
    )


def check_gate(
    settings: Settings, resolved: Resolved, prepared: Prepared, registered: Registered | None, run_id: str
) -> tuple[str, Skip | None]:
    """The gate rule: the version to deploy (registered now, or reused), and a ``Skip`` of the deploy
    when it failed the evaluation gate (the run's outcome is then recorded here)."""
    commit = resolved.commit
    if registered:
        model_version, gate_passed = registered.model_version, registered.gate_passed
        reasons = "; ".join(registered.gate_reasons)
    else:  # reused: registered by an earlier run of this commit or of one with the same inputs
        reused = reused_version(resolved, prepared)
        if reused is None:
            raise GitopsMLError(
                f"commit {commit.commit_sha}: no model version was registered and none can be reused: nothing to deploy"
            )
        model_version = reused
        gate_passed, reasons = pipeline.gate_of(settings, model_version)
    if gate_passed:
        return model_version, None
    outcome = pipeline.finish(settings, commit, run_id, model_version, None, reused=not registered)
    return model_version, Skip(
        f"NOT PROMOTED: model version {model_version} of commit {commit.commit_sha} failed "
        f"the evaluation gate ({reasons}); the serving model is unchanged",
        outcome["summary"],
        outcome,
    )


def finish(
    settings: Settings, resolved: Resolved, prepared: Prepared, deployed: Deployed, run_id: str
) -> dict[str, Any]:
    """The final record and Git note of a run that deployed (see ``pipeline.finish``); a run that did
    not deploy was finished where it stopped (``check_gate``)."""
    return pipeline.finish(
        settings,
        resolved.commit,
        run_id,
        deployed.model_version,
        deployed,
        reused=bool(reused_version(resolved, prepared)),
    )


def record_failure(
    settings: Settings, commit: Commit | None, requested_sha: str | None, run_id: str, step: str, reason: str
) -> str:
    """The failure rule: record the failed step and its reason against the commit (else the SHA the conf
    asked for), write the Git note (when the commit was resolved), mark the work tree failed; return the
    run note's sentence."""
    from gitops_ml import retention  # noqa: PLC0415

    commit_sha = commit.commit_sha if commit else requested_sha or "unknown"
    pipeline.record(settings, commit_sha, run_id, step, "failure", reason=reason)
    if commit:
        pipeline.write_note(
            settings, commit_sha, {"gitops_ml_run": run_id, "failed_step": step, "reason": reason, "deployed": False}
        )
    retention.after_run(settings, commit_sha, failed=True, run_id=run_id)  # never raises
    return f"FAILED in step {step}: {reason}"


def run_local(
    settings: Settings,
    commit_sha: str | None = None,
    run_id: str = "local",
    dag_id: str = "local",
    deploy_model: bool = True,
    conf: RunConf | dict[str, Any] | None = None,
) -> LocalRun:
    """Run every step in this process, in order, with the rules the Airflow tasks apply (for the CLI and
    tests).  ``conf`` is a run conf as the DAG takes it (``commit_sha`` wins over its own); without
    ``deploy_model`` a version that passed the gate is registered but not deployed."""
    conf = conf if isinstance(conf, RunConf) else RunConf.parse(conf)
    if commit_sha:
        conf = conf.model_copy(update={"commit_sha": commit_sha})
    progress: dict[str, Any] = {"step": STEPS[0], "commit": None}
    try:
        return _run_steps(settings, conf, run_id, dag_id, deploy_model, progress)
    except Exception as exc:
        record_failure(settings, progress["commit"], conf.commit_sha, run_id, progress["step"], str(exc))
        raise


def _run_steps(
    settings: Settings, conf: RunConf, run_id: str, dag_id: str, deploy_model: bool, progress: dict[str, Any]
) -> LocalRun:
    """The body of ``run_local``; ``progress`` names the step running and the commit once resolved."""

    def at(step: str) -> None:
        progress["step"] = step

    resolved = start(settings, conf, run_id, dag_id)
    if isinstance(resolved, Skip):
        log.info("%s", resolved.reason)
        return LocalRun(skipped=resolved.reason, outcome={"summary": resolved.outcome})
    commit = progress["commit"] = resolved.commit
    at("prepare_workspace")
    prepared = pipeline.prepare(settings, commit)
    at("pull_data")
    pulled = pipeline.pull_data(settings, commit, prepared.workdir, prepared.params)
    built: dict[str, Any] = {}
    registered = None
    reuse = skip_training(resolved, prepared)
    if reuse is not None:
        log.info("%s", reuse.reason)
    else:
        run_lineage = lineage(resolved, prepared, pulled)
        at("train")
        trained = pipeline.train(settings, commit, prepared.params, run_lineage)
        at("evaluate")
        evaluated = pipeline.evaluate(settings, commit, prepared.params, trained)
        at("register")
        registered = pipeline.register(settings, trained, evaluated, run_lineage)
        built = {
            "gate_reasons": registered.gate_reasons,
            "test_accuracy": evaluated.test_accuracy,
            "mlflow_run_id": trained.run_id,
        }
    at("deploy")
    model_version, not_promoted = check_gate(settings, resolved, prepared, registered, run_id)
    done = {
        "commit": commit,
        "data_hash": pulled.data_hash,
        "model_version": model_version,
        "reused": registered is None,
        "gate_passed": not_promoted is None,
        **built,
    }
    if not_promoted is not None:
        log.info("%s", not_promoted.reason)
        return LocalRun(**done, outcome=not_promoted.finished)
    if not deploy_model:  # registered (alias challenger), not deployed: the outcome says NOT DEPLOYED
        at("record")
        return LocalRun(
            **done, outcome=pipeline.finish(settings, commit, run_id, model_version, None, registered is None)
        )
    deployed = pipeline.deploy(settings, commit, model_version, prepared.params, run_id)
    at("record")
    return LocalRun(**done, deploy=deployed, outcome=finish(settings, resolved, prepared, deployed, run_id))


def record_plan(settings: Settings, plan: dict[str, Any], run_id: str) -> None:
    """Record what gets no run: superseded commits and force-pushes (records, Elasticsearch, Git notes)."""
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
    from gitops_ml import runs, watch as watch_mod  # noqa: PLC0415

    plan = watch_mod.plan_branch(watch, settings.git_cache_dir, previous_sha, head_sha).to_dict()
    for decision in plan["decisions"]:
        log.info("commit %s: %s (%s)", decision["commit_sha"], decision["action"], decision["reason"])
    record_plan(settings, plan, run_id)
    return plan, runs.run_requests(watch.name, watch.branch, plan, trigger)


def plan_retrain(watch: Watch, when: datetime) -> list[dict[str, Any]]:
    """The one run of a scheduled retraining of the head of ``watch``'s branch (a rejected head is recorded)."""
    from gitops_ml import runs, watch as watch_mod  # noqa: PLC0415

    settings = watch.run_settings()
    plan = watch_mod.plan_branch(watch, settings.git_cache_dir, None).to_dict()
    decision = plan["decisions"][0]
    if decision["action"] == "rejected":
        log.error("scheduled retraining of %s refused: %s", decision["commit_sha"], decision["reason"])
        record_plan(settings, plan, "retrain")
    return [runs.retrain_request(watch.name, watch.branch, str(watch.retrain_schedule), plan, when)]
