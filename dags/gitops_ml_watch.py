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

from gitops_ml.airflow.watch_dags import retrain_dag, watcher_dag
from gitops_ml.watch import load_watches

for _watch in load_watches():
    globals()[f"watch__{_watch.name}"] = watcher_dag(_watch, doc_md=__doc__)
    if _watch.retrain_schedule:
        globals()[f"retrain__{_watch.name}"] = retrain_dag(_watch, doc_md=__doc__)
