"""gitops_ml_pipeline: one run per commit of the model repository.

resolve_commit -> prepare_workspace -> pull_data -> train -> evaluate -> register -> deploy -> record

A commit whose model already exists (same SHA, or same data + params + model code, e.g. a
``git revert``) skips train/evaluate/register and deploys that version.  A challenger that
fails the evaluation gate is registered but NOT PROMOTED: deploy and record are skipped
with the reason, the run succeeds, the serving model is untouched.

Trigger it with ``gitops-ml trigger [SHA]`` (run id ``commit__<sha>``) or from the UI
with ``commit_sha`` in the run conf.  Only wiring lives here: the task bodies are in
``gitops_ml.airflow.steps`` and are imported when a task runs, so parsing this file
never imports TensorFlow, MLflow or DVC.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

from gitops_ml.runs import PIPELINE_DAG_ID


def _record_failure(context):
    from gitops_ml.airflow.steps import record_failure

    record_failure(context)


@dag(
    dag_id=PIPELINE_DAG_ID,
    schedule=None,
    catchup=False,
    # Runs of different repositories (and commits) go on in parallel on the workers; deploys go one at a
    # time (``deploy`` below), so two commits of one branch never deploy at once.
    max_active_runs=8,
    tags=["gitops-ml"],
    doc_md=__doc__,
    params={
        "commit_sha": Param(None, type=["null", "string"], description="Commit to build (default: branch head)"),
        # No credentials in a run conf (it is stored in the Airflow DB and shown in the UI): use a watch name.
        "repo_url": Param(
            None,
            type=["null", "string"],
            pattern=r"^(?![^/]*://[^/]*@)",
            description="Model repository without credentials (default: GITOPS_ML_REPO_URL); "
            "a repository that needs credentials is named by its watch",
        ),
        "branch": Param(None, type=["null", "string"], description="Tracked branch (default: GITOPS_ML_BRANCH)"),
        "watch": Param(None, type=["null", "string"], description="Watched repository name (watch configuration)"),
        "trigger": Param(None, type=["null", "string"], description="push | webhook | schedule | manual"),
        "decision": Param(
            None,
            type=["null", "string"],
            enum=[None, "train", "no_retrain", "rejected"],
            description="Set by the watcher: no_retrain / rejected record the reason and run nothing",
        ),
        "reason": Param(None, type=["null", "string"], description="Why the watcher decided so"),
        "signature_warning": Param(None, type=["null", "string"], description="Signature policy warn: the reason"),
    },
    default_args={"retries": 1, "retry_delay": timedelta(seconds=15), "on_failure_callback": _record_failure},
)
def gitops_ml_pipeline():
    @task
    def resolve_commit():
        from gitops_ml.airflow import steps

        return steps.resolve_commit()

    @task
    def prepare_workspace(resolved):
        from gitops_ml.airflow import steps

        return steps.prepare_workspace(resolved)

    @task
    def pull_data(resolved, prepared):
        from gitops_ml.airflow import steps

        return steps.pull_data(resolved, prepared)

    @task(execution_timeout=timedelta(hours=6))
    def train(resolved, prepared, pulled):
        from gitops_ml.airflow import steps

        return steps.train(resolved, prepared, pulled)

    @task
    def evaluate(resolved, prepared, trained):
        from gitops_ml.airflow import steps

        return steps.evaluate(resolved, prepared, trained)

    @task
    def register(resolved, prepared, pulled, trained, evaluated):
        from gitops_ml.airflow import steps

        return steps.register(resolved, prepared, pulled, trained, evaluated)

    # One deploy at a time across the pipeline's runs (Airflow's own per-task limit, counted by the
    # scheduler in the metadata DB, so it holds across workers): the convergence check of a deploy
    # (is a newer commit already serving?) and its alias move never interleave with another deploy.
    @task(trigger_rule="none_failed_min_one_success", max_active_tis_per_dag=1)
    def deploy(resolved, prepared, registered):
        from gitops_ml.airflow import steps

        return steps.deploy(resolved, prepared, registered)

    @task(trigger_rule="none_failed_min_one_success")
    def record(resolved, prepared, deployed):
        from gitops_ml.airflow import steps

        return steps.record(resolved, prepared, deployed)

    resolved = resolve_commit()
    prepared = prepare_workspace(resolved)
    pulled = pull_data(resolved, prepared)
    trained = train(resolved, prepared, pulled)
    evaluated = evaluate(resolved, prepared, trained)
    pulled >> evaluated  # evaluate reads the images pull_data put on disk (not its XCom)
    registered = register(resolved, prepared, pulled, trained, evaluated)
    deployed = deploy(resolved, prepared, registered)
    record(resolved, prepared, deployed)


pipeline_dag = gitops_ml_pipeline()
