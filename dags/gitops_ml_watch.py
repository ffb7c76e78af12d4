"""Commit watchers and scheduled retraining, one pair of DAGs per watched repository.

``gitops_ml_watch__<name>`` (``@continuous``, one active run): a deferrable ``GitCommitSensor``
waits in the triggerer until the branch head moves past the last planned commit (an Airflow
Variable); ``plan_commits`` fetches and decides per new commit (burst policy every/latest, path
filter, signature policy, force-push detection); ``start_pipeline_runs`` starts one
``gitops_ml_pipeline`` run per commit, named ``commit__<sha>`` (an existing run is skipped, so a
restart or a webhook that got there first never causes a second run); ``advance_cursor``
remembers the head.

``gitops_ml_retrain__<name>`` (``retrain_schedule``, default weekly): a run of the pipeline for
the head of the branch named ``retrain__<sha>__<schedule time>``.

Why not an ``AssetWatcher``: runs it creates are named ``asset_triggered__<time>``, several
events may be merged into one run, and it keeps no cursor across triggerer restarts; a
continuous watcher DAG gives one run per SHA, named by it, with the cursor in the Airflow DB.

Repositories come from the watch configuration (``gitops_ml.watch``): no code change to add one.
Parsing this file reads that YAML file only (no TensorFlow, MLflow or DVC import).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from gitops_ml.airflow.git_sensor import GitCommitSensor
from gitops_ml.watch import load_watches

PIPELINE_DAG_ID = "gitops_ml_pipeline"
# A start date in the past: without one, Airflow 3.3.2's @continuous timetable gives the first run a
# zero-length data interval and computes the next run with the same logical date, so the scheduler
# logs "run already exists; skipping dagrun creation" forever and the watcher never runs again.
START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)


def watcher_dag(watch):
    @dag(dag_id=f"gitops_ml_watch__{watch.name}", schedule="@continuous", max_active_runs=1, catchup=False,
         start_date=START_DATE,
         tags=["gitops-ml", "watcher"], doc_md=__doc__,
         description=f"Start a pipeline run for each new commit on {watch.branch} of {watch.safe_url}",
         default_args={"retries": 2, "retry_delay": timedelta(seconds=10)})
    def watcher():
        found = GitCommitSensor(
            task_id="wait_for_commit", repo_url=watch.repo_url, branch=watch.branch,
            since_sha="{{ var.value.get('%s', '') }}" % watch.cursor_key, poll_interval=watch.poll_interval,
            timeout=watch.sensor_timeout, soft_fail=True, deferrable=True)

        @task
        def plan_commits(found, run_id=None):
            from gitops_ml.airflow import watch_steps

            return watch_steps.plan_commits(watch.name, found, run_id)

        @task(trigger_rule="none_failed")
        def advance_cursor(found):
            from gitops_ml.airflow import watch_steps

            return watch_steps.advance_cursor(watch.name, found)

        requests = plan_commits(found.output)
        started = TriggerDagRunOperator.partial(
            task_id="start_pipeline_runs", trigger_dag_id=PIPELINE_DAG_ID, logical_date=None,
            skip_when_already_exists=True, wait_for_completion=False, retries=2,
        ).expand_kwargs(requests)
        started >> advance_cursor(found.output)

    return watcher()


def retrain_dag(watch):
    @dag(dag_id=f"gitops_ml_retrain__{watch.name}", schedule=watch.retrain_schedule, max_active_runs=1,
         catchup=False, tags=["gitops-ml", "retrain"], doc_md=__doc__,
         description=f"Scheduled retraining ({watch.retrain_schedule}) of the head of {watch.branch}")
    def retrain():
        @task
        def plan_retrain(data_interval_end=None, logical_date=None, run_after=None):
            from gitops_ml.airflow import watch_steps

            return watch_steps.plan_retrain(watch.name, data_interval_end or logical_date or run_after)

        TriggerDagRunOperator.partial(
            task_id="start_pipeline_run", trigger_dag_id=PIPELINE_DAG_ID, logical_date=None,
            skip_when_already_exists=True, wait_for_completion=False,
        ).expand_kwargs(plan_retrain())

    return retrain()


for _watch in load_watches():
    globals()[f"watch__{_watch.name}"] = watcher_dag(_watch)
    if _watch.retrain_schedule:
        globals()[f"retrain__{_watch.name}"] = retrain_dag(_watch)
