"""A long GitOps history in the real stores, for the page's tests and its benchmark.

``seed(settings, count)`` writes, for ``count`` commits of a real Git repository (made with
``git fast-import``, mirrored where the pipeline keeps its mirror):

- a pipeline run per commit in the Airflow metadata DB (run, its eight task instances, the XComs
  the tasks push: resolved commit, train, evaluate, register, the outcome sentence);
- a model version per commit in the MLflow registry with the tags ``register``/``deploy`` set
  (every tenth one fails the gate, whose reasons ``gitops_ml.gate`` gives: accuracy, the per-class
  recall floor, the drop against the champion), the champion alias on the newest promoted one;
- the run's final record under ``<home>/records``.

Nothing is trained: only what the page reads is written, through the stores' own APIs.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gitops_ml import gate, records, registry, source
from gitops_ml.config import Settings
from gitops_ml.runs import DEFAULT_WATCH, run_id_for

RULES = {"min_accuracy": 0.8, "max_accuracy_drop": 0.02, "min_class_recall": 0.5}
TASKS = ("resolve_commit", "prepare_workspace", "pull_data", "train", "evaluate", "register", "deploy", "record")


BASE = datetime(2026, 11, 1, tzinfo=UTC)
"""Commit ``n`` is made, and its run starts, ``2 n`` minutes after this."""


def make_repository(path: Path, count: int, subject: str = "Tune the model") -> list[str]:
    """A repository with ``count`` commits on ``main`` (``<subject>, step <n>``, commit ``n`` at ``BASE``
    plus ``2 n`` minutes); returns their SHAs, oldest first."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    stream = []
    start = int(BASE.timestamp())
    for n in range(1, count + 1):
        message = f"{subject}, step {n}\n".encode()
        content = f"step: {n}\n".encode()
        stream.append(b"commit refs/heads/main\nmark :%d\n" % n)
        stream.append(b"author Ada Lovelace <ada@example.invalid> %d +0000\n" % (start + 120 * n))
        stream.append(b"committer Ada Lovelace <ada@example.invalid> %d +0000\n" % (start + 120 * n))
        stream.append(b"data %d\n%s" % (len(message), message))
        if n > 1:
            stream.append(b"from :%d\n" % (n - 1))
        stream.append(b"M 644 inline params.yaml\ndata %d\n%s\n" % (len(content), content))
    subprocess.run(["git", "fast-import", "--quiet"], input=b"".join(stream), cwd=path, check=True)
    return subprocess.run(
        ["git", "rev-list", "--reverse", "main"], cwd=path, check=True, capture_output=True, text=True
    ).stdout.split()


def seed(
    settings: Settings,
    count: int,
    failed_every: int = 10,
    watch: str = DEFAULT_WATCH,
    local_repo: Path | None = None,
    subject: str = "Tune the model",
) -> dict:
    """Seed ``count`` commits of history of the watched repository ``watch`` (``settings`` are its run
    settings: repository, model name; see the module docstring); returns the SHAs, the champion and
    the run ids.  The commits are made in ``settings.repo_url``, a local path, or in ``local_repo``
    and mirrored as if fetched from ``settings.repo_url`` (a Git host's URL the page links to)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    repo = local_repo or Path(settings.repo_url)
    shas = make_repository(repo, count, subject)
    mirror = source.mirror_path(settings.repo_url, settings.git_cache_dir)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(mirror)], check=True)

    mlc = registry.client(settings)
    registry.experiment_id(settings)
    mlc.create_registered_model(settings.model_name)
    champion = None
    previous_promoted = None
    run_rows, ti_rows, xcom_values = [], [], []
    for n, sha in enumerate(shas, start=1):
        failed = n % failed_every == 0
        accuracy = 0.5 if failed else 0.95
        recall = {"0": 0.6, "7": 0.3} if failed else {"0": 0.97, "7": 0.91}
        compared = previous_promoted  # the champion this commit was judged against
        decision = gate.decide(
            {"accuracy": accuracy, "recall": recall}, {"accuracy": 0.95} if compared else None, RULES
        )
        reasons = "; ".join(decision["reasons"]) or None
        run_id = run_id_for(sha, watch=watch)
        start = BASE + timedelta(minutes=2 * n)
        tags = registry.lineage_tags(
            {
                "commit_sha": sha,
                "branch": "main",
                "repo_url": settings.repo_url,
                "data_hash": f"{n:032x}",
                "airflow_dag_id": "gitops_ml_pipeline",
                "airflow_run_id": run_id,
                "code_hash": "c0de",
                "test_accuracy": accuracy,
                "gate": "failed" if failed else "passed",
                "gate_reasons": reasons,
                "gate_compared_with": previous_promoted,
                **gate.recall_tags(
                    {
                        **{f"{gate.RECALL_PREFIX}{c}": r for c, r in recall.items()},
                        **gate.recall_metrics(recall, RULES),
                    }
                ),
                **(
                    {}
                    if failed
                    else {
                        "deploy_outcome": "promoted",
                        "deployed_at": (start + timedelta(seconds=65)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "served_for_commit": sha,
                        "replaced_version": previous_promoted,
                    }
                ),
            }
        )
        version = mlc.create_model_version(settings.model_name, source=str(repo), tags=tags)
        number = str(version.version)
        summary = (
            f"NOT PROMOTED: version {number} failed the gate: {reasons}"
            if failed
            else f"PROMOTED: version {number} replaced version {compared}"
        )
        if not failed:
            champion, previous_promoted = number, number
        run_rows.append(
            {
                "dag_id": "gitops_ml_pipeline",
                "run_id": run_id,
                "run_type": "manual",
                "state": "success",
                "conf": {"commit_sha": sha, "trigger": "push", "watch": watch},
                "run_after": start,
                "queued_at": start,
                "start_date": start,
                "end_date": start + timedelta(seconds=65),
                "logical_date": None,
            }
        )
        for i, task in enumerate(TASKS):
            skipped = failed and task in ("deploy", "record")
            ti_rows.append(
                {
                    "id": uuid.uuid4(),
                    "task_id": task,
                    "dag_id": "gitops_ml_pipeline",
                    "run_id": run_id,
                    "map_index": -1,
                    "try_number": 1,
                    "pool": "default_pool",
                    "pool_slots": 1,
                    "state": "skipped" if skipped else "success",
                    "start_date": start + timedelta(seconds=8 * i),
                    "end_date": start + timedelta(seconds=8 * i + 7),
                }
            )
        commit = {
            "repo_url": settings.repo_url,
            "branch": "main",
            "commit_sha": sha,
            "message": f"{subject}, step {n}",
            "author": "Ada Lovelace",
            "committed_at": start.isoformat(),
        }
        xcom_values.append(
            (
                run_id,
                start,
                {
                    "resolve_commit": {"commit": commit, "existing_version": None},
                    "prepare_workspace": {"reuse_version": None, "inputs_hash": f"{n:032x}"},
                    "train": {"run_id": uuid.uuid4().hex, "experiment_id": "1"},
                    "evaluate": {
                        "test_accuracy": accuracy,
                        "champion_accuracy": 0.95 if compared else None,
                        "champion_version": compared,
                        "gate_passed": not failed,
                        "gate_reasons": decision["reasons"],
                    },
                    "register": {"model_version": number, "gate_passed": not failed},
                },
                summary,
            )
        )
        doc = records.outcome_record(
            sha,
            run_id,
            "pipeline",
            "not_promoted" if failed else "success",
            summary=summary,
            gate="failed" if failed else "passed",
            deployed=not failed,
            promoted=not failed,
            model=f"{settings.model_name} version {number}",
            replaced_version=compared,
        )
        records.write(settings.records_dir, doc)
    registry.set_alias(settings, champion)
    with create_session() as session:
        session.execute(DagRun.__table__.insert(), run_rows)
        session.execute(TaskInstance.__table__.insert(), ti_rows)
        ids = dict(
            session.execute(
                DagRun.__table__.select()
                .with_only_columns(DagRun.run_id, DagRun.id)
                .where(DagRun.dag_id == "gitops_ml_pipeline")
            ).all()
        )
        xcoms = []
        for run_id, at, values, summary in xcom_values:
            for task, value in values.items():
                xcoms.append(
                    {
                        "dag_run_id": ids[run_id],
                        "task_id": task,
                        "map_index": -1,
                        "key": "return_value",
                        "dag_id": "gitops_ml_pipeline",
                        "run_id": run_id,
                        "value": value,
                        "timestamp": at,
                    }
                )
            xcoms.append(
                {
                    "dag_run_id": ids[run_id],
                    "task_id": "record",
                    "map_index": -1,
                    "key": "gitops_ml_outcome",
                    "dag_id": "gitops_ml_pipeline",
                    "run_id": run_id,
                    "value": summary,
                    "timestamp": at,
                }
            )
        session.execute(XComModel.__table__.insert(), xcoms)
    return {"shas": shas, "champion": champion, "run_ids": [run_id_for(sha, watch=watch) for sha in shas]}
