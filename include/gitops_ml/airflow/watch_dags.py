"""The watcher and retraining DAGs of a watched repository (wiring only; see ``dags/gitops_ml_watch.py``).

Factories, so that the DAG file and the detection benchmark's poke-mode baseline build the
very same watcher.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from gitops_ml.airflow.git_sensor import GitCommitSensor
from gitops_ml.runs import PIPELINE_DAG_ID, retrain_dag_id, watch_dag_id
from gitops_ml.watch import Watch

# A start date in the past: without one, Airflow 3.3.2's @continuous timetable gives the first run a
# zero-length data interval and computes the next run with the same logical date, so the scheduler
# logs "run already exists; skipping dagrun creation" forever and the watcher never runs again.
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def watcher_dag(
    watch: Watch,
    *,
    dag_id: str | None = None,
    deferrable: bool = True,
    doc_md: str | None = None,
    tags: tuple[str, ...] = ("gitops-ml", "watcher"),
):
    """The watcher DAG of ``watch``; ``deferrable=False`` gives the poke-mode baseline of the benchmark."""

    @dag(
        dag_id=dag_id or watch_dag_id(watch.name),
        schedule="@continuous",
        max_active_runs=1,
        catchup=False,
        start_date=START_DATE,
        tags=list(tags),
        doc_md=doc_md,
        description=f"Start a pipeline run for each new commit on {watch.branch} of {watch.safe_url}",
        default_args={"retries": 2, "retry_delay": timedelta(seconds=10)},
    )
    def watcher():
        poke_mode: dict[str, Any] = {} if deferrable else {"mode": "poke"}
        found = GitCommitSensor(
            # The watch's name, not its URL: credentials are looked up where git runs, never stored.
            task_id="wait_for_commit",
            watch=watch.name,
            branch=watch.branch,
            previous_sha="{{ var.value.get('%s', '') }}" % watch.cursor_key,  # noqa: UP031 - Jinja braces
            poll_interval=watch.poll_interval,
            timeout=watch.sensor_timeout,
            soft_fail=True,
            deferrable=deferrable,
            **poke_mode,
        )

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
            task_id="start_pipeline_runs",
            trigger_dag_id=PIPELINE_DAG_ID,
            logical_date=None,
            skip_when_already_exists=True,
            wait_for_completion=False,
            retries=2,
        ).expand_kwargs(requests)
        started >> advance_cursor(found.output)

    return watcher()


def retrain_dag(watch: Watch, doc_md: str | None = None):
    """The scheduled retraining DAG of ``watch``."""

    @dag(
        dag_id=retrain_dag_id(watch.name),
        schedule=watch.retrain_schedule,
        max_active_runs=1,
        catchup=False,
        tags=["gitops-ml", "retrain"],
        doc_md=doc_md,
        description=f"Scheduled retraining ({watch.retrain_schedule}) of the head of {watch.branch}",
    )
    def retrain():
        @task
        def plan_retrain(data_interval_end=None, logical_date=None, run_after=None):
            from gitops_ml.airflow import watch_steps

            return watch_steps.plan_retrain(watch.name, data_interval_end or logical_date or run_after)

        TriggerDagRunOperator.partial(
            task_id="start_pipeline_run",
            trigger_dag_id=PIPELINE_DAG_ID,
            logical_date=None,
            skip_when_already_exists=True,
            wait_for_completion=False,
        ).expand_kwargs(plan_retrain())

    return retrain()
