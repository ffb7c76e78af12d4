"""Airflow listener: a pipeline run's note ends with what the run did to its commit.

The run note is the first thing the Airflow UI shows of a run; the watcher writes why the
run exists ("push: build commit ..."), and when the run ends this listener appends the
outcome the tasks pushed as XCom ``gitops_ml_outcome`` (after the decision and the gate's
result: ``decision: trained; gate passed: test accuracy 0.9611 against champion version 2's
0.9583``): ``PROMOTED: version 3 replaced version 2``, ``NOT PROMOTED: ...`` with the gate's
reasons, ``NOT DEPLOYED: ... older than``, ``NO RETRAIN NEEDED ...``, ``REJECTED ...`` or ``FAILED in step X: message``.

Listeners run where Airflow changes a run's state (the scheduler, the API server for a
state set in the UI, ``dag.test()``), with the run attached to that process's database
session, so the note is saved with the state change.  No repository code runs here: the
listener only reads a small JSON string from XCom.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

from gitops_ml.runs import PIPELINE_DAG_ID

log = logging.getLogger(__name__)

OUTCOME_KEY = "gitops_ml_outcome"
MAX_NOTE = 1000  # Airflow's dag_run_note.content column


def with_outcome(note: str | None, outcome: str) -> str:
    """``note`` followed by ``outcome`` on a new line (once), cut to what the note column holds."""
    note = (note or "").strip()
    if outcome in note:
        return note
    text = f"{note}\n{outcome}" if note else outcome
    return text if len(text) <= MAX_NOTE else text[: MAX_NOTE - 1] + "…"


def _outcome_of(dag_run, session) -> str | None:
    from airflow.models.xcom import XComModel

    from gitops_ml.history import note_lines

    rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key=OUTCOME_KEY)).all()
    values = [(row.timestamp, XComModel.deserialize_value(row)) for row in rows]
    if values:
        steps = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id,
                dag_ids=dag_run.dag_id,
                key="return_value",
                task_ids=["prepare_workspace", "evaluate"],
            )
        ).all()
        returned = {row.task_id: XComModel.deserialize_value(row) for row in steps}
        lines = note_lines({k: v for k, v in returned.items() if isinstance(v, dict)})
        return "\n".join([*lines, str(max(values, key=lambda item: item[0])[1])])
    failed = [ti.task_id for ti in dag_run.get_task_instances(state=["failed", "upstream_failed"], session=session)]
    return f"FAILED in step {failed[0]}" if failed else None


@hookimpl
def on_dag_run_success(dag_run, msg: str) -> None:
    _annotate(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    _annotate(dag_run)


def _annotate(dag_run) -> None:
    if dag_run.dag_id != PIPELINE_DAG_ID:
        return
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    try:
        session = object_session(dag_run)
        if session is not None:  # the scheduler's (or API server's) session: saved with the state change
            outcome = _outcome_of(dag_run, session)
            if outcome:
                dag_run.note = with_outcome(dag_run.note, outcome)
            return
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as own:  # a detached run (``dag.test()``): our own short transaction
            attached = own.scalar(select(DagRun).where(DagRun.id == dag_run.id))
            if attached is not None and (outcome := _outcome_of(attached, own)):
                attached.note = with_outcome(attached.note, outcome)
    except Exception:  # a listener must never break the scheduler: log and go on
        log.exception("could not write the outcome into the note of run %s", dag_run.run_id)
